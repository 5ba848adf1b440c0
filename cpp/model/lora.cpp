#include "model/lora.h"

#include <cmath>
#include <algorithm>
#include <cstring>
#include <sys/mman.h>
#include <string>

#include "core/error.h"
#include "core/quants.h"

namespace tmill {

namespace {
bool holds_exactly_in_half(const std::vector<float>& values) {
    for (float v : values)
        if (fp16_to_fp32(fp32_to_fp16(v)) != v) return false;
    return true;
}

// (n_in, n_out) of a projection of this model; (0, 0) where it has none (GPT-2 has no gate)
std::pair<int64_t, int64_t> projection_shape(const Model& m, Projection p) {
    const HParams& hp = m.hparams();
    const int64_t E = hp.n_embd, QD = hp.n_head * hp.head_dim, KD = hp.n_head_kv * hp.head_dim;
    switch (p) {
        case Projection::q: return {E, QD};
        case Projection::k:
        case Projection::v: return {E, KD};
        case Projection::o: return {QD, E};
        case Projection::gate: return gated(m.spec().mlp) ? std::pair<int64_t, int64_t>{E, hp.n_ff}
                                                          : std::pair<int64_t, int64_t>{0, 0};
        case Projection::up: return {E, hp.n_ff};
        case Projection::down: return {hp.n_ff, E};
    }
    return {0, 0};
}
}  // namespace

LoraAdapter::LoraAdapter(const std::shared_ptr<const Model>& model)
    : model_(model), staged_(static_cast<size_t>(model->hparams().n_layer) * 7),
      pairs_(static_cast<size_t>(model->hparams().n_layer) * 7) {}

void LoraAdapter::add(int64_t layer, Projection p, const float* a, int64_t r, int64_t n_in, const float* b, int64_t n_out,
                      float scale) {
    const std::shared_ptr<const Model> model = model_.lock();
    if (!model) fail(ErrorKind::invalid_arg, "the adapter's model is gone");
    if (sealed_) fail(ErrorKind::invalid_arg, "the adapter is sealed; pairs are added before seal()");
    const std::string what = "layer " + std::to_string(layer) + " " + projection_name(p);
    if (layer < 0 || layer >= model->hparams().n_layer)
        fail(ErrorKind::invalid_arg, "LoRA " + what + ": the model has " + std::to_string(model->hparams().n_layer) + " layers");
    const auto [want_in, want_out] = projection_shape(*model, p);
    if (want_in == 0) fail(ErrorKind::invalid_arg, "LoRA " + what + ": this model has no such projection");
    if (n_in != want_in || n_out != want_out)
        fail(ErrorKind::invalid_arg, "LoRA " + what + ": A x B give [" + std::to_string(n_out) + ", " + std::to_string(n_in) +
                                         "] but the projection is [" + std::to_string(want_out) + ", " + std::to_string(want_in) + "]");
    if (r <= 0) fail(ErrorKind::invalid_arg, "LoRA " + what + ": rank must be positive");
    if (staged_[index(layer, p)]) fail(ErrorKind::invalid_arg, "LoRA " + what + " is given twice");
    if (!std::isfinite(scale)) fail(ErrorKind::invalid_arg, "LoRA " + what + ": the scale is not finite");
    std::vector<float> bt(static_cast<size_t>(r * n_out));
    for (int64_t o = 0; o < n_out; ++o)
        for (int64_t j = 0; j < r; ++j) bt[static_cast<size_t>(j * n_out + o)] = b[o * r + j];
    for (const float* v : {a, static_cast<const float*>(bt.data())})
        for (int64_t i = 0, n = v == a ? r * n_in : r * n_out; i < n; ++i)
            if (!std::isfinite(v[i])) fail(ErrorKind::numeric, "LoRA " + what + ": the weights contain NaN or infinity");
    staged_[index(layer, p)] =
        std::make_unique<Staged>(Staged{r, n_in, n_out, scale, std::vector<float>(a, a + r * n_in), std::move(bt)});
    ++n_pairs_;
    n_params_ += r * (n_in + n_out);
}

void LoraAdapter::seal() {
    if (sealed_) return;
    const std::shared_ptr<const Model> model = model_.lock();
    if (!model) fail(ErrorKind::invalid_arg, "the adapter's model is gone");
    constexpr size_t kAlign = 64, kHugePage = size_t{2} << 20;
    auto padded = [](size_t n) { return (n + kAlign - 1) / kAlign * kAlign; };
    size_t total = 0;
    for (const auto& st : staged_)
        if (st) total += padded(st->a.size() * sizeof(float)) + padded(st->bt.size() * sizeof(float));
    total = std::max<size_t>((total + kHugePage - 1) / kHugePage * kHugePage, kHugePage);
    arena_.reset(static_cast<uint8_t*>(std::aligned_alloc(kHugePage, total)));
    if (!arena_) fail(ErrorKind::resource, "no memory for the adapter's " + std::to_string(total) + " bytes");
#ifdef MADV_HUGEPAGE
    madvise(arena_.get(), total, MADV_HUGEPAGE);   // a hint; without huge pages the layout still helps
#endif
    Backend& be = model->backend();
    uint8_t* at = arena_.get();
    for (size_t i = 0; i < staged_.size(); ++i) {   // index order = layer, then projection: a pass's order
        const Staged* st = staged_[i].get();
        if (!st) continue;
        // fp16 where it holds every value of the pair exactly (adapters saved in f16, GGUF LoRAs): the
        // same products from half the bytes, which decode streams once per token
        const bool half = holds_exactly_in_half(st->a) && holds_exactly_in_half(st->bt);
        auto place = [&](const std::vector<float>& values, int64_t rows, int64_t cols) {
            const size_t bytes = values.size() * (half ? sizeof(uint16_t) : sizeof(float));
            if (half) quantize_row(DType::f16, values.data(), at, static_cast<int64_t>(values.size()));
            else std::memcpy(at, values.data(), bytes);
            Weight w = be.upload_weight(half ? DType::f16 : DType::f32, rows, cols, at, nullptr, WeightUse::rows);
            at += padded(bytes);
            bytes_ += bytes;
            return w;
        };
        auto pair = std::make_unique<Pair>();
        pair->a = place(st->a, st->r, st->n_in);
        pair->bt = place(st->bt, st->r, st->n_out);
        pair->scale = st->scale;
        pairs_[i] = std::move(pair);
    }
    staged_.clear();
    sealed_ = true;
}

void LoraSet::set_slot(int32_t slot, Mix mix) {
    if (slot < 0) fail(ErrorKind::invalid_arg, "adapter slots are >= 0, got " + std::to_string(slot));
    for (const auto& [adapter, scale] : mix) {
        if (!adapter) fail(ErrorKind::invalid_arg, "an adapter of the mix is missing");
        if (!adapter->sealed()) fail(ErrorKind::invalid_arg, "an adapter of the mix is not sealed");
        if (!std::isfinite(scale)) fail(ErrorKind::invalid_arg, "adapter scales must be finite");
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (mix.empty()) slots_.erase(slot);
    else slots_[slot] = std::move(mix);
}

// Runs of consecutive sequences on the same slot share items; each adapter of the slot's mix adds
// its pair of every projection of the group it targets.
void LoraSet::low_rank_additions(const ForwardContext& ctx, int64_t layer, const ProjectionOutput* outs, int n,
                                 const float* x, int64_t n_in, std::vector<LoraItem>& add) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (slots_.empty()) return;
    const auto& segs = ctx.segments;
    for (size_t s = 0; s < segs.size();) {
        size_t e = s + 1;
        while (e < segs.size() && segs[e].adapter == segs[s].adapter) ++e;
        const auto slot = segs[s].adapter < 0 ? slots_.end() : slots_.find(segs[s].adapter);
        if (slot != slots_.end()) {
            const int64_t row0 = segs[s].row0, rows = segs[e - 1].row0 + segs[e - 1].n_rows - row0;
            for (int i = 0; i < n; ++i)   // an output's items adjacent (Backend::lora_add), in the mix's order
                for (const auto& [adapter, user_scale] : slot->second)
                    if (const LoraAdapter::Pair* pair = adapter->find(layer, outs[i].role)) {
                        if (pair->a.cols != n_in || pair->bt.cols != outs[i].n_out)
                            fail(ErrorKind::invalid_arg, "LoRA shapes do not match the projection");
                        add.push_back({outs[i].out + row0 * outs[i].n_out, x + row0 * n_in, &pair->a, &pair->bt,
                                       pair->scale * user_scale, rows});
                    }
        }
        s = e;
    }
}

}  // namespace tmill
