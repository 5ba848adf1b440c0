// Token sampling. One documented order, applied to a copy of the logits:
//   1. repetition penalty over the last repeat_last_n tokens (HF rule: positive logits are divided
//      by the penalty, negative ones multiplied), then presence and frequency penalties
//   2. logit bias
//   3. temperature (0 = greedy: the first index of the largest logit, nothing else applies)
//   4. top-k, 5. top-p (nucleus), 6. min-p (relative to the most likely token), 7. typical-p
//   8. draw from the renormalised survivors with the sampler's own seeded generator.
#pragma once

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

    // The distribution the last sample() drew from: (token, probability) of the survivors, the
    // most likely first, the rest in no particular order. Empty after a greedy pick.
    const std::vector<std::pair<int32_t, float>>& last_candidates() const { return candidates_; }

    // Applies steps 1-2 in place (shared with callers that need the penalised logits).
    void apply_penalties(float* logits, const int32_t* history, int64_t n_history) const;

private:
    SamplerParams params_;
    int64_t n_vocab_;
    Rng rng_;
    std::vector<float> work_;
    std::vector<double> dense_;
    std::vector<std::pair<int32_t, float>> candidates_;
};

}  // namespace tmill
