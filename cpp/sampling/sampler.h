// Token sampling. One documented order, applied to a copy of the logits:
//   1. repetition penalty over the last repeat_last_n tokens (HF rule: positive logits are divided
//      by the penalty, negative ones multiplied), then presence and frequency penalties
//   2. logit bias
//   3. temperature (0 = greedy: the first index of the largest logit, nothing else applies)
//   4. top-k, 5. top-p (nucleus), 6. min-p (relative to the most likely token), 7. typical-p
//   8. draw from the renormalised survivors with the sampler's own seeded generator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace tmill {

struct SamplerParams {
    float temperature = 1.0f;
    int32_t top_k = 0;                  // 0: off
    float top_p = 1.0f;                 // 1: off
    float min_p = 0.0f;                 // 0: off
    float typical_p = 1.0f;             // 1: off
    float repetition_penalty = 1.0f;    // 1: off
    float presence_penalty = 0.0f;
    float frequency_penalty = 0.0f;
    int32_t repeat_last_n = 64;         // -1: the whole history
    std::vector<std::pair<int32_t, float>> logit_bias;
    uint64_t seed = 0;
};

// Throws tmill::Error(invalid_arg) naming the first parameter out of range.
void validate(const SamplerParams& p, int64_t n_vocab);

// xoshiro256** seeded through splitmix64: the same seed gives the same stream on every machine.
class Rng {
public:
    explicit Rng(uint64_t seed);
    uint64_t next();
    double uniform();   // [0, 1) with 53 random bits

private:
    uint64_t s_[4];
};

class Sampler {
public:
    Sampler(SamplerParams params, int64_t n_vocab);

    const SamplerParams& params() const { return params_; }
    int64_t n_vocab() const { return n_vocab_; }

    // Picks the next token from logits [n_vocab] given the tokens so far (for penalties).
    int32_t sample(const float* logits, const int32_t* history, int64_t n_history);
    // The same with only `allowed` tokens eligible (structured output; the others as if banned).
    int32_t sample(const float* logits, const int32_t* history, int64_t n_history, const std::vector<int32_t>& allowed);

    // The distribution sample() draws from (steps 1-7): tokens and probabilities summing to 1, the
    // most likely first; a greedy sampler gives its token with probability 1. Speculative decoding
    // compares the target's and the draft's distributions, so both come from this one pipeline.
    void distribution(const float* logits, const int32_t* history, int64_t n_history, std::vector<int32_t>& ids,
                      std::vector<double>& probs);
    // Step 8 on a given distribution (probabilities >= 0 summing to 1, e.g. a speculative residual),
    // with this sampler's generator.
    int32_t draw(const int32_t* ids, const double* probs, size_t n);
    // The generator's next uniform in [0, 1) (a speculative acceptance test).
    double uniform() { return rng_.uniform(); }

    // The distribution the last sample() drew from: (token, probability) of the survivors, the
    // most likely first, the rest in no particular order. Empty after a greedy pick.
    const std::vector<std::pair<int32_t, float>>& last_candidates() const { return candidates_; }

    // Applies steps 1-2 in place (shared with callers that need the penalised logits).
    void apply_penalties(float* logits, const int32_t* history, int64_t n_history) const;

private:
    int32_t sample_filtered(const float* logits, const int32_t* history, int64_t n_history,
                            const std::vector<int32_t>* allowed);
    // steps 1-7: the greedy token (temperature 0), or -1 with candidates_ and probs_ filled in
    int32_t filter(const float* logits, const int32_t* history, int64_t n_history,
                   const std::vector<int32_t>* allowed = nullptr);

    SamplerParams params_;
    int64_t n_vocab_;
    Rng rng_;
    std::vector<float> work_;
    std::vector<double> dense_;
    std::vector<std::pair<int32_t, float>> candidates_;
    std::vector<double> probs_;    // the candidates' probabilities at full precision
    std::vector<int32_t> ids_;     // scratch: the candidates' ids
};

}  // namespace tmill
