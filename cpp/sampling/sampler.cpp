#include "sampling/sampler.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <string>
#include <unordered_map>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "core/error.h"

namespace tmill {

namespace {

// The sampler runs once per sequence per step on the scheduler's thread while the compute threads
// wait, so its passes over the vocabulary use SSE2 (every x86-64 has it) four values at a time; the
// compiler vectorizes neither a loop with an early exit nor std::max_element. A greedy step on a
// 49,152-token vocabulary took 81 us with those, 14 us now (with the call from Python).

// out = x, and whether every value is finite (|x| <= FLT_MAX fails for inf and NaN)
bool copy_finite(const float* x, int64_t n, float* out) {
    int64_t i = 0;
    bool ok = true;
#if defined(__SSE2__)
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff)), largest = _mm_set1_ps(FLT_MAX);
    __m128 all = _mm_castsi128_ps(_mm_set1_epi32(-1));
    for (; i + 4 <= n; i += 4) {
        const __m128 v = _mm_loadu_ps(x + i);
        _mm_storeu_ps(out + i, v);
        all = _mm_and_ps(all, _mm_cmple_ps(_mm_and_ps(v, abs_mask), largest));
    }
    ok = _mm_movemask_ps(all) == 0xF;
#endif
    for (; i < n; ++i) {
        out[i] = x[i];
        ok &= std::fabs(x[i]) <= FLT_MAX;
    }
    return ok;
}

// The index of the largest of n > 0 finite values, the smallest such index on ties (as
// std::max_element): the maximum first, then the first value equal to it.
int64_t first_argmax(const float* x, int64_t n) {
    float best = x[0];
    int64_t i = 0;
#if defined(__SSE2__)
    __m128 m0 = _mm_set1_ps(x[0]), m1 = m0, m2 = m0, m3 = m0;
    for (; i + 16 <= n; i += 16) {
        m0 = _mm_max_ps(m0, _mm_loadu_ps(x + i));
        m1 = _mm_max_ps(m1, _mm_loadu_ps(x + i + 4));
        m2 = _mm_max_ps(m2, _mm_loadu_ps(x + i + 8));
        m3 = _mm_max_ps(m3, _mm_loadu_ps(x + i + 12));
    }
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3)));
    best = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
#endif
    for (; i < n; ++i) best = std::max(best, x[i]);
    i = 0;
#if defined(__SSE2__)
    const __m128 target = _mm_set1_ps(best);
    for (; i + 4 <= n; i += 4) {
        const int hits = _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(x + i), target));
        if (hits) return i + __builtin_ctz(static_cast<unsigned>(hits));
    }
#endif
    while (x[i] != best) ++i;
    return i;
}

}  // namespace

void validate(const SamplerParams& p, int64_t n_vocab) {
    auto bad = [](const std::string& msg) { fail(ErrorKind::invalid_arg, msg); };
    if (n_vocab < 1 || n_vocab > (int64_t(1) << 24)) bad("the vocabulary size must be in [1, 16777216], got " + std::to_string(n_vocab));
    if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature))
        bad("temperature must be >= 0, got " + std::to_string(p.temperature));
    if (p.top_k < 0) bad("top_k must be >= 0 (0 disables it), got " + std::to_string(p.top_k));
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) bad("top_p must be in (0, 1], got " + std::to_string(p.top_p));
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) bad("min_p must be in [0, 1], got " + std::to_string(p.min_p));
    if (!(p.typical_p > 0.0f && p.typical_p <= 1.0f))
        bad("typical_p must be in (0, 1], got " + std::to_string(p.typical_p));
    if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty))
        bad("repetition_penalty must be > 0, got " + std::to_string(p.repetition_penalty));
    if (!std::isfinite(p.presence_penalty)) bad("presence_penalty must be finite");
    if (!std::isfinite(p.frequency_penalty)) bad("frequency_penalty must be finite");
    if (p.repeat_last_n < -1) bad("repeat_last_n must be >= -1, got " + std::to_string(p.repeat_last_n));
    for (const auto& [id, bias] : p.logit_bias) {
        if (id < 0 || id >= n_vocab)
            bad("logit_bias token id " + std::to_string(id) + " is outside the vocabulary [0, " + std::to_string(n_vocab) + ")");
        // -inf bans a token; +inf or NaN would make every other token's probability meaningless
        if (std::isnan(bias) || bias == INFINITY) bad("logit_bias values must be finite or -inf, got " + std::to_string(bias));
    }
}

Rng::Rng(uint64_t seed) {
    for (uint64_t& s : s_) {
        seed += 0x9E3779B97F4A7C15ull;
        uint64_t z = seed;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        s = z ^ (z >> 31);
    }
}

uint64_t Rng::next() {
    auto rotl = [](uint64_t x, int k) { return (x << k) | (x >> (64 - k)); };
    uint64_t result = rotl(s_[1] * 5, 7) * 9;
    uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }

Sampler::Sampler(SamplerParams params, int64_t n_vocab) : params_(std::move(params)), n_vocab_(n_vocab), rng_(params_.seed) {
    validate(params_, n_vocab_);
}

void Sampler::apply_penalties(float* logits, const int32_t* history, int64_t n_history) const {
    const SamplerParams& p = params_;
    bool penalise = p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
    if (penalise && n_history > 0) {
        int64_t window = p.repeat_last_n < 0 ? n_history : std::min<int64_t>(p.repeat_last_n, n_history);
        std::unordered_map<int32_t, int> counts;
        for (int64_t i = n_history - window; i < n_history; ++i)
            if (history[i] >= 0 && history[i] < n_vocab_) ++counts[history[i]];
        for (const auto& [id, count] : counts) {
            float& l = logits[id];
            l = l > 0.0f ? l / p.repetition_penalty : l * p.repetition_penalty;
            l -= p.presence_penalty + p.frequency_penalty * static_cast<float>(count);
        }
    }
    for (const auto& [id, bias] : p.logit_bias) logits[id] += bias;
}

int32_t Sampler::sample(const float* logits, const int32_t* history, int64_t n_history) {
    static const std::vector<int32_t>* const all = nullptr;
    return sample_filtered(logits, history, n_history, all);
}

int32_t Sampler::sample(const float* logits, const int32_t* history, int64_t n_history, const std::vector<int32_t>& allowed) {
    return sample_filtered(logits, history, n_history, &allowed);
}

int32_t Sampler::sample_filtered(const float* logits, const int32_t* history, int64_t n_history,
                                 const std::vector<int32_t>* allowed) {
    const int32_t greedy = filter(logits, history, n_history, allowed);
    if (greedy >= 0) return greedy;
    std::vector<int32_t>& ids = ids_;
    ids.resize(candidates_.size());
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = candidates_[i].first;
    return draw(ids.data(), probs_.data(), ids.size());
}

void Sampler::distribution(const float* logits, const int32_t* history, int64_t n_history, std::vector<int32_t>& ids,
                           std::vector<double>& probs) {
    const int32_t greedy = filter(logits, history, n_history);
    ids.clear();
    probs.clear();
    if (greedy >= 0) {
        ids.push_back(greedy);
        probs.push_back(1.0);
        return;
    }
    for (const auto& [id, p] : candidates_) ids.push_back(id);
    probs = probs_;
}

int32_t Sampler::draw(const int32_t* ids, const double* probs, size_t n) {
    if (n == 0) fail(ErrorKind::invalid_arg, "cannot draw from an empty distribution");
    // Walk token ids in ascending order: the token depends only on the distribution and the uniform
    // draw, not on how the candidates happen to be ordered.
    dense_.assign(static_cast<size_t>(n_vocab_), 0.0);
    int32_t last = -1;   // the largest id with any probability: what rounding falls back to
    for (size_t i = 0; i < n; ++i) {
        if (ids[i] < 0 || ids[i] >= n_vocab_ || !(probs[i] >= 0.0) || !std::isfinite(probs[i]))
            fail(ErrorKind::invalid_arg, "a distribution to draw from needs ids in the vocabulary and finite probabilities >= 0");
        dense_[static_cast<size_t>(ids[i])] += probs[i];
        if (probs[i] > 0.0) last = std::max(last, ids[i]);
    }
    if (last < 0) fail(ErrorKind::invalid_arg, "cannot draw from a distribution whose probabilities are all 0");
    double u = rng_.uniform(), cum = 0.0;
    for (int32_t id = 0; id <= last; ++id) {
        cum += dense_[static_cast<size_t>(id)];
        if (u < cum) return id;
    }
    return last;   // rounding left u above the final cumulative sum
}

int32_t Sampler::filter(const float* logits, const int32_t* history, int64_t n_history,
                        const std::vector<int32_t>* allowed) {
    const SamplerParams& p = params_;
    work_.resize(static_cast<size_t>(n_vocab_));
    if (!copy_finite(logits, n_vocab_, work_.data())) {
        const int64_t i = std::find_if(logits, logits + n_vocab_, [](float x) { return !std::isfinite(x); }) - logits;
        fail(ErrorKind::numeric, "logit " + std::to_string(i) + " is " + std::to_string(logits[i]) +
                                     "; the model's output is not a distribution");
    }
    apply_penalties(work_.data(), history, n_history);
    candidates_.clear();
    if (allowed) {   // everything outside the allowed set is banned
        std::vector<float> kept(allowed->size());
        for (size_t i = 0; i < allowed->size(); ++i) {
            const int32_t id = (*allowed)[i];
            if (id < 0 || id >= n_vocab_) fail(ErrorKind::invalid_arg, "an allowed token id is outside the vocabulary");
            kept[i] = work_[static_cast<size_t>(id)];
        }
        std::fill(work_.begin(), work_.end(), -INFINITY);
        for (size_t i = 0; i < allowed->size(); ++i) work_[static_cast<size_t>((*allowed)[i])] = kept[i];
    }
    const auto best = work_.begin() + first_argmax(work_.data(), n_vocab_);
    if (*best == -INFINITY)
        fail(ErrorKind::invalid_arg, allowed ? "no token can be sampled: the allowed tokens are all banned"
                                             : "no token can be sampled: logit_bias bans every token of the vocabulary");

    if (p.temperature == 0.0f) return static_cast<int32_t>(best - work_.begin());

    // Candidates sorted by logit, most likely first. Only as many are sorted as the filters need:
    // top-k bounds it; top-p grows the sorted prefix until it holds the requested mass.
    std::vector<std::pair<int32_t, float>>& c = candidates_;
    c.resize(static_cast<size_t>(n_vocab_));
    for (int64_t i = 0; i < n_vocab_; ++i) c[static_cast<size_t>(i)] = {static_cast<int32_t>(i), work_[static_cast<size_t>(i)] / p.temperature};
    auto by_logit = [](const std::pair<int32_t, float>& a, const std::pair<int32_t, float>& b) {
        return a.second > b.second || (a.second == b.second && a.first < b.first);
    };
    size_t n = c.size();
    if (p.top_k > 0 && static_cast<size_t>(p.top_k) < n) {
        n = static_cast<size_t>(p.top_k);
        std::nth_element(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(n), c.end(), by_logit);
    }

    // softmax normaliser over the top-k survivors (needs only their max and sum)
    std::partial_sort(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(std::min<size_t>(n, 64)), c.begin() + static_cast<std::ptrdiff_t>(n), by_logit);
    size_t sorted = std::min<size_t>(n, 64);
    const float max_logit = c[0].second;
    double total = 0.0;
    for (size_t i = 0; i < n; ++i) total += std::exp(static_cast<double>(c[i].second - max_logit));
    auto prob = [&](size_t i) { return std::exp(static_cast<double>(c[i].second - max_logit)) / total; };

    // top-p: the smallest prefix whose mass reaches top_p
    if (p.top_p < 1.0f) {
        double cum = 0.0;
        size_t keep = 0;
        for (;;) {
            while (keep < sorted && cum < p.top_p) cum += prob(keep++);
            if (cum >= p.top_p || sorted == n) break;
            size_t grow = std::min(n, sorted * 4);
            std::partial_sort(c.begin() + static_cast<std::ptrdiff_t>(sorted), c.begin() + static_cast<std::ptrdiff_t>(grow),
                              c.begin() + static_cast<std::ptrdiff_t>(n), by_logit);
            sorted = grow;
        }
        n = std::max<size_t>(keep, 1);
    }
    // typical-p breaks ties by likelihood order, so it needs the survivors sorted; nothing else does
    if (p.typical_p < 1.0f && sorted < n) {
        std::sort(c.begin() + static_cast<std::ptrdiff_t>(sorted), c.begin() + static_cast<std::ptrdiff_t>(n), by_logit);
        sorted = n;
    }
    // min-p: drop tokens less likely than min_p times the most likely one (c[0])
    if (p.min_p > 0.0f) {
        double floor_p = p.min_p * prob(0);
        size_t kept = 1;
        for (size_t i = 1; i < n; ++i)
            if (prob(i) >= floor_p) c[kept++] = c[i];
        n = kept;
    }
    c.resize(n);
    std::vector<double> probs(n);
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) sum += probs[i] = prob(i);
    for (double& q : probs) q /= sum;

    // typical-p: keep the tokens whose surprise is closest to the entropy, up to typical_p mass
    if (p.typical_p < 1.0f && n > 1) {
        double entropy = 0.0;
        for (double q : probs) if (q > 0.0) entropy -= q * std::log(q);
        std::vector<size_t> order(n);
        for (size_t i = 0; i < n; ++i) order[i] = i;
        std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
            return std::fabs(-std::log(probs[a]) - entropy) < std::fabs(-std::log(probs[b]) - entropy);
        });
        double cum = 0.0;
        size_t keep = 0;
        while (keep < n && cum < p.typical_p) cum += probs[order[keep++]];
        std::vector<bool> kept(n, false);
        for (size_t i = 0; i < keep; ++i) kept[order[i]] = true;
        std::vector<std::pair<int32_t, float>> survivors;
        std::vector<double> survivor_probs;
        for (size_t i = 0; i < n; ++i)
            if (kept[i]) { survivors.push_back(c[i]); survivor_probs.push_back(probs[i]); }
        c.swap(survivors);
        probs.swap(survivor_probs);
        n = c.size();
        sum = 0.0;
        for (double q : probs) sum += q;
        for (double& q : probs) q /= sum;
    }

    for (size_t i = 0; i < n; ++i) c[i].second = static_cast<float>(probs[i]);
    probs_.swap(probs);
    return -1;
}

}  // namespace tmill
