// The forward pass: embed -> per layer [attention block, MLP block, extensions] -> outputs, each step
// through the backend. Buffers (backend memory, T = tokens of the whole batch, E = n_embd):
//   x    [T, E]            residual stream
//   h    [T, E]            normed input of a block / a block's output before it is added to x
//   q    [T, n_head * hd]  queries; k, v [T, n_head_kv * hd] keys and values of the new tokens
//   att  [T, n_head * hd]  attention output
//   ff_a, ff_b [T, n_ff]   MLP gate (then the activation) and up projections
//   out  [U, E]            final-normed rows that are output (U <= T distinct rows)
//   logits [min(T, 16), n_vocab]
#include <algorithm>
#include <cmath>
#include <map>

#include "core/error.h"
#include "model/model.h"

namespace tmill {

const char* projection_name(Projection p) {
    switch (p) {
        case Projection::q: return "q";
        case Projection::k: return "k";
        case Projection::v: return "v";
        case Projection::o: return "o";
        case Projection::gate: return "gate";
        case Projection::up: return "up";
        case Projection::down: return "down";
    }
    return "?";
}

struct Model::Pass {
    Pass(const ForwardRequest& r, int64_t rows, Backend& be, const AttentionShape& s)
        : req(r), T(rows), pos(static_cast<size_t>(rows)), shape(s), ctx{be, batch, rows, {}} {}

    const ForwardRequest& req;
    int64_t T;
    std::vector<int32_t> pos;              // [T] position of each row (host)
    std::vector<AttentionSegment> segs;    // one per sequence
    std::vector<BatchSegment> batch;       // the same, as extensions see it
    AttentionShape shape;
    ForwardContext ctx;
    std::vector<LoraItem> low_rank;        // one projection group's low-rank additions (reused)
};

// The model's sliding window (Mistral) and the cache's local window: the narrower one applies.
int64_t Model::attention_window(const KVCache& cache) const {
    int64_t a = hp_.sliding_window, b = cache.config().local_window;
    if (a <= 0) return b;
    if (b <= 0) return a;
    return std::min(a, b);
}

void Model::ensure_workspace(int64_t T) {
    if (T <= ws_.rows) return;
    const int64_t E = hp_.n_embd, QD = hp_.n_head * hp_.head_dim, KD = hp_.n_head_kv * hp_.head_dim;
    Backend& be = *backend_;
    auto n = [](int64_t v) { return static_cast<size_t>(v); };
    // the new buffers are complete before the old ones go, so a failed allocation changes nothing
    Workspace w;
    w.x = BackendBuffer(be, n(T * E));
    w.h = BackendBuffer(be, n(T * E));
    w.q = BackendBuffer(be, n(T * QD));
    w.k = BackendBuffer(be, n(T * KD));
    w.v = BackendBuffer(be, n(T * KD));
    w.att = BackendBuffer(be, n(T * QD));
    w.ff_a = BackendBuffer(be, n(T * hp_.n_ff));
    w.ff_b = BackendBuffer(be, n(T * hp_.n_ff));
    w.out = BackendBuffer(be, n(T * E));
    w.logits = BackendBuffer(be, n(std::min(T, kLogitRows) * hp_.n_vocab));
    w.rows = T;
    ws_ = std::move(w);
}

void Model::validate(const ForwardRequest& req, int64_t& T) const {
    const int64_t V = hp_.n_vocab;
    if (req.batch.empty()) fail(ErrorKind::invalid_arg, "the batch is empty");
    T = 0;
    for (size_t s = 0; s < req.batch.size(); ++s) {
        const SequenceInput& in = req.batch[s];
        if (!in.cache || &in.cache->model() != this) fail(ErrorKind::invalid_arg, "a cache in the batch belongs to another model");
        for (size_t o = 0; o < s; ++o)
            if (req.batch[o].cache == in.cache)
                fail(ErrorKind::invalid_arg, "the same cache appears twice in one batch (sequences " + std::to_string(o) +
                                                 " and " + std::to_string(s) + ")");
        if (in.n <= 0) fail(ErrorKind::invalid_arg, "sequence " + std::to_string(s) + " of the batch has no new tokens");
        if ((in.tokens == nullptr) == (in.embeds == nullptr))
            fail(ErrorKind::invalid_arg, "give either token ids or embeddings");
        const int64_t need = in.cache->n_past() + in.n;
        if (need > in.cache->capacity())
            fail(ErrorKind::context, "sequence of " + std::to_string(need) + " tokens exceeds the context of " +
                                         std::to_string(in.cache->capacity()) + " tokens");
        if (spec_->positions == PositionKind::learned && need > hp_.n_ctx_train)
            fail(ErrorKind::context, "the model has learned positions for " + std::to_string(hp_.n_ctx_train) +
                                         " tokens; the sequence needs " + std::to_string(need));
        if (in.tokens) {
            for (int64_t i = 0; i < in.n; ++i)
                if (in.tokens[i] < 0 || in.tokens[i] >= V)
                    fail(ErrorKind::invalid_arg, "token id " + std::to_string(in.tokens[i]) + " is outside the vocabulary [0, " +
                                                     std::to_string(V) + ")");
        } else {
            const int64_t n = in.n * hp_.n_embd;
            for (int64_t i = 0; i < n; ++i)
                if (!std::isfinite(in.embeds[i])) fail(ErrorKind::numeric, "input embeddings contain NaN or infinity");
        }
        T += in.n;
    }
    auto check_rows = [&](const std::vector<int64_t>& rows, const void* out, const char* what) {
        if (!rows.empty() && !out) fail(ErrorKind::invalid_arg, std::string("no buffer for the ") + what);
        for (int64_t r : rows)
            if (r < 0 || r >= T)
                fail(ErrorKind::invalid_arg, std::string(what) + " row " + std::to_string(r) + " is outside the batch's " +
                                                 std::to_string(T) + " rows");
    };
    if (req.decode_rows < 0 || req.decode_rows > T)
        fail(ErrorKind::invalid_arg, "decode_rows must be in [0, " + std::to_string(T) + "], got " + std::to_string(req.decode_rows));
    if (spec_->encoder && !req.logit_rows.empty())
        fail(ErrorKind::invalid_arg, "this " + hp_.arch + " model is an encoder: it has no logits (ask for hidden states)");
    check_rows(req.logit_rows, req.logits, "logits");
    check_rows(req.hidden_rows, req.hidden, "hidden states");
    for (const LayerRows& lr : req.layer_rows) {
        if (lr.layer < 0 || lr.layer > hp_.n_layer)
            fail(ErrorKind::invalid_arg, "layer " + std::to_string(lr.layer) + " is outside [0, " + std::to_string(hp_.n_layer) + "]");
        check_rows(lr.rows, lr.out, "layer states");
    }
}

void Model::forward(const ForwardRequest& req) {
    std::lock_guard<std::mutex> lock(forward_mutex_);
    int64_t T = 0;
    validate(req, T);
    // each cache is used by this pass alone; it grows (if it must) before anything is written
    std::vector<KVCache::Claim> claims;
    for (const SequenceInput& in : req.batch) claims.emplace_back(*in.cache);
    for (const SequenceInput& in : req.batch) in.cache->reserve(in.cache->n_past() + in.n);
    ensure_workspace(T);
    PassScope scope(*backend_);
    backend_->set_rows_mode(default_mode(req));

    const float scale = hp_.attn_scale > 0.0f ? hp_.attn_scale : 1.0f / std::sqrt(static_cast<float>(hp_.head_dim));
    Pass p(req, T, *backend_,
           AttentionShape{static_cast<int>(hp_.n_head), static_cast<int>(hp_.n_head_kv), static_cast<int>(hp_.head_dim), scale});
    p.ctx.matmul = [this, &p](const MatmulItem* items, int n, const float* x) { project_rows(p, items, n, x, {}); };
    int64_t row = 0;
    const int64_t decode_rows = req.batch_invariant ? req.decode_rows : 0;   // the first rows of the pass
    for (const SequenceInput& in : req.batch) {
        const int64_t n_past = in.cache->n_past();
        for (int64_t i = 0; i < in.n; ++i) p.pos[static_cast<size_t>(row + i)] = static_cast<int32_t>(n_past + i);
        p.segs.push_back({row, in.n, n_past, 0, {}, !spec_->encoder, row < decode_rows});   // window and KV view: per layer
        p.batch.push_back({row, in.n, n_past, in.cache, in.adapter});
        row += in.n;
    }

    try {
        embed(p);
        for (int64_t l = 0; l < hp_.n_layer; ++l) {
            if (req.interrupted && req.interrupted()) fail(ErrorKind::interrupted, "the forward pass was interrupted");
            copy_layer_rows(p, l);
            attention_block(p, l);
            mlp_block(p, l);
            for (const auto& ext : extensions_) ext->after_layer(p.ctx, l, ws_.x.get());
        }
        copy_layer_rows(p, hp_.n_layer);
        outputs(p);
    } catch (...) {
        for (const SequenceInput& in : req.batch) in.cache->discard_write(in.n);
        throw;
    }
    for (const SequenceInput& in : req.batch) in.cache->advance(in.n);
}

// x[T, E] = token embeddings (or the given embeddings) (+ learned positions) (encoders: + token type 0,
// then normed)
void Model::embed(Pass& p) {
    Backend& be = *backend_;
    const int64_t E = hp_.n_embd;
    for (size_t s = 0; s < p.req.batch.size(); ++s) {
        const SequenceInput& in = p.req.batch[s];
        float* dst = ws_.x.get() + p.segs[s].row0 * E;
        if (in.tokens) {
            be.get_rows(dst, tok_embd_, in.tokens, in.n);
            if (spec_->embed_scale) be.scale(dst, std::sqrt(static_cast<float>(E)), in.n * E);   // given embeddings are not
        } else {
            be.upload(dst, in.embeds, static_cast<size_t>(in.n * E));
        }
    }
    if (spec_->positions == PositionKind::learned) {
        be.get_rows(ws_.h.get(), pos_embd_, p.pos.data(), p.T);
        be.add(ws_.x.get(), ws_.h.get(), p.T * E);
    }
    if (type_embd_) {
        const std::vector<int32_t> type0(static_cast<size_t>(p.T), 0);
        be.get_rows(ws_.h.get(), type_embd_, type0.data(), p.T);
        be.add(ws_.x.get(), ws_.h.get(), p.T * E);
    }
    if (spec_->encoder) norm(ws_.x.get(), ws_.x.get(), embd_norm_, p.T);
}

void Model::norm(float* out, const float* in, const Norm& n, int64_t rows) {
    if (spec_->norm == NormKind::layer) backend_->layer_norm(out, in, n.weight, n.bias, rows, hp_.n_embd, hp_.norm_eps);
    else backend_->rms_norm(out, in, n.weight, rows, hp_.n_embd, hp_.norm_eps);
}

RowsMode Model::default_mode(const ForwardRequest& req) const {
    if (req.rows_as_decode) return RowsMode::as_decode;
    return req.batch_invariant ? RowsMode::invariant : RowsMode::fast;
}

// The products of one input with several weights for every row of the pass. A batch-invariant pass
// computes its decode rows and its prompt rows each with their own arithmetic.
void Model::project_rows(Pass& p, const MatmulItem* items, int n, const float* x, const std::vector<LoraItem>& lora) {
    const int64_t D = p.req.batch_invariant ? std::min(p.req.decode_rows, p.T) : 0;
    const int n_lora = static_cast<int>(lora.size());
    if (D == 0) {
        backend_->matmul_group_lora(items, n, x, p.T, lora.data(), n_lora);
    } else {
        backend_->set_rows_mode(RowsMode::as_decode);
        backend_->matmul_group(items, n, x, D);
        if (D < p.T) {
            MatmulItem rest[4];
            for (int i = 0; i < n; ++i) rest[i] = {items[i].out + D * items[i].w->rows, items[i].w};
            backend_->set_rows_mode(RowsMode::invariant);
            backend_->matmul_group(rest, n, x + D * items[0].w->cols, p.T - D);
        }
        backend_->set_rows_mode(default_mode(p.req));
        if (n_lora > 0) backend_->lora_add(lora.data(), n_lora);
    }
}

// A layer's projections of one input with the extensions' low-rank additions, then their other
// changes to each output (the adapter seam).
void Model::project(Pass& p, const MatmulItem* items, const Projection* roles, int n, const float* x, int64_t layer) {
    p.low_rank.clear();
    ProjectionOutput outs[4];
    for (int i = 0; i < n; ++i) outs[i] = {roles[i], items[i].out, items[i].w->rows};
    const int64_t n_in = items[0].w->cols;
    for (const auto& ext : extensions_) ext->low_rank_additions(p.ctx, layer, outs, n, x, n_in, p.low_rank);
    project_rows(p, items, n, x, p.low_rank);
    for (const auto& ext : extensions_) ext->after_projections(p.ctx, layer, outs, n, x, n_in);
}

// x += Wo · attn(rope(Wq·h), rope(Wk·h), Wv·h),  h = norm(x)
// (encoders, post-norm: h = x, and x = norm(x + Wo · attn(...)))
void Model::attention_block(Pass& p, int64_t l) {
    Backend& be = *backend_;
    const Layer& L = layers_[static_cast<size_t>(l)];
    float *x = ws_.x.get(), *h = ws_.h.get(), *q = ws_.q.get(), *k = ws_.k.get(), *v = ws_.v.get(), *att = ws_.att.get();
    if (!spec_->encoder) norm(h, x, L.attn_norm, p.T);
    const MatmulItem qkv[] = {{q, &L.wq}, {k, &L.wk}, {v, &L.wv}};
    const Projection qkv_roles[] = {Projection::q, Projection::k, Projection::v};
    project(p, qkv, qkv_roles, 3, spec_->encoder ? x : h, l);
    if (spec_->qk_norm) {   // every head's query and key normed on its own, in place
        be.rms_norm(q, q, L.q_norm.weight, p.T * p.shape.n_heads, p.shape.head_dim, hp_.norm_eps);
        be.rms_norm(k, k, L.k_norm.weight, p.T * p.shape.n_kv_heads, p.shape.head_dim, hp_.norm_eps);
    }
    // interleaved families: a local layer has the sliding window and its own RoPE base, a global one neither
    const bool local = !hp_.local_layers.empty() && hp_.local_layers[static_cast<size_t>(l)];
    const bool global = !hp_.local_layers.empty() && !local;
    if (spec_->positions == PositionKind::rope) {
        const float* factors = hp_.rope_freq_factors.empty() ? nullptr : hp_.rope_freq_factors.data();
        const float theta = local && hp_.rope_theta_local > 0.0f ? hp_.rope_theta_local : hp_.rope_theta;
        be.rope(q, p.T, p.shape.n_heads, p.shape.head_dim, p.pos.data(), theta, hp_.rope_style, factors);
        be.rope(k, p.T, p.shape.n_kv_heads, p.shape.head_dim, p.pos.data(), theta, hp_.rope_style, factors);
    }
    for (size_t s = 0; s < p.segs.size(); ++s) {
        const KVCache& cache = *p.req.batch[s].cache;
        p.segs[s].kv = cache.layer_view(static_cast<size_t>(l));
        p.segs[s].window = global ? cache.config().local_window : attention_window(cache);
    }
    be.kv_store(k, v, p.segs.data(), static_cast<int>(p.segs.size()), p.shape);
    be.attention(att, q, p.segs.data(), static_cast<int>(p.segs.size()), p.shape);
    const MatmulItem o[] = {{h, &L.wo}};
    const Projection o_role[] = {Projection::o};
    project(p, o, o_role, 1, att, l);
    if (spec_->sandwich_norms) norm(h, h, L.post_attn_norm, p.T);
    be.add(x, h, p.T * hp_.n_embd);
    if (spec_->encoder) norm(x, x, L.attn_norm, p.T);
}

// x += W_down · act(h),  h = norm(x);  act = silu(W_gate h) * (W_up h)  or  gelu(W_up h)
// (encoders, post-norm: h = x, and x = norm(x + W_down · act(h)))
void Model::mlp_block(Pass& p, int64_t l) {
    Backend& be = *backend_;
    const Layer& L = layers_[static_cast<size_t>(l)];
    float *x = ws_.x.get(), *h = ws_.h.get(), *a = ws_.ff_a.get(), *b = ws_.ff_b.get();
    if (!spec_->encoder) norm(h, x, L.ffn_norm, p.T);
    const float* in = spec_->encoder ? x : h;
    if (gated(spec_->mlp)) {
        const MatmulItem gate_up[] = {{a, &L.w_gate}, {b, &L.w_up}};
        const Projection roles[] = {Projection::gate, Projection::up};
        project(p, gate_up, roles, 2, in, l);
        if (spec_->mlp == MlpKind::swiglu) be.swiglu(a, b, p.T * hp_.n_ff);
        else be.geglu(a, b, p.T * hp_.n_ff);
    } else {
        const MatmulItem up[] = {{a, &L.w_up}};
        const Projection role[] = {Projection::up};
        project(p, up, role, 1, in, l);
        if (spec_->mlp == MlpKind::gelu_erf) be.gelu_erf(a, p.T * hp_.n_ff);
        else be.gelu(a, p.T * hp_.n_ff);
    }
    const MatmulItem down[] = {{h, &L.w_down}};
    const Projection down_role[] = {Projection::down};
    project(p, down, down_role, 1, a, l);
    if (spec_->sandwich_norms) norm(h, h, L.post_ffn_norm, p.T);
    be.add(x, h, p.T * hp_.n_embd);
    if (spec_->encoder) norm(x, x, L.ffn_norm, p.T);
}

// The residual stream's requested rows at depth `layer` (before decoder layer `layer` runs).
void Model::copy_layer_rows(Pass& p, int64_t layer) {
    const int64_t E = hp_.n_embd;
    for (const LayerRows& lr : p.req.layer_rows)
        if (lr.layer == layer)
            for (size_t i = 0; i < lr.rows.size(); ++i)
                backend_->download(lr.out + static_cast<int64_t>(i) * E, ws_.x.get() + lr.rows[i] * E, static_cast<size_t>(E));
}

// Final norm of the distinct rows asked for, hidden states out, and the vocabulary projection for
// the logit rows only, kLogitRows at a time.
void Model::outputs(Pass& p) {
    const ForwardRequest& req = p.req;
    if (req.logit_rows.empty() && req.hidden_rows.empty()) return;
    Backend& be = *backend_;
    const int64_t E = hp_.n_embd, V = hp_.n_vocab;
    std::map<int64_t, int32_t> slot;   // batch row -> row of `out`
    for (int64_t r : req.logit_rows) slot.emplace(r, 0);
    for (int64_t r : req.hidden_rows) slot.emplace(r, 0);
    std::vector<int32_t> rows;
    for (auto& [r, u] : slot) {
        u = static_cast<int32_t>(rows.size());
        rows.push_back(static_cast<int32_t>(r));
    }
    const int64_t U = static_cast<int64_t>(rows.size());
    auto table = [&](float* data, int64_t n) {   // activations viewed as a table, to gather rows
        Weight w;
        w.type = DType::f32;
        w.rows = n;
        w.cols = E;
        w.data = reinterpret_cast<const uint8_t*>(data);
        w.row_stride = static_cast<size_t>(E) * sizeof(float);
        return w;
    };
    if (spec_->encoder) {   // post-norm: the last block's norm was the final one
        be.get_rows(ws_.out.get(), table(ws_.x.get(), p.T), rows.data(), U);   // out[U, E]
    } else {
        be.get_rows(ws_.h.get(), table(ws_.x.get(), p.T), rows.data(), U);    // h[U, E]
        norm(ws_.out.get(), ws_.h.get(), output_norm_, U);                // out[U, E]
    }
    for (size_t i = 0; i < req.hidden_rows.size(); ++i)
        be.download(req.hidden + static_cast<int64_t>(i) * E, ws_.out.get() + slot[req.hidden_rows[i]] * E,
                    static_cast<size_t>(E));
    if (req.logit_rows.empty()) return;

    // the distinct logit rows, in chunks: gather their normed rows, project, hand each to its requests
    std::map<int32_t, std::vector<size_t>> wanted;   // row of out -> positions in logit_rows
    for (size_t i = 0; i < req.logit_rows.size(); ++i) wanted[slot[req.logit_rows[i]]].push_back(i);
    std::vector<int32_t> chunk;
    std::vector<const std::vector<size_t>*> targets;
    auto flush = [&]() {
        const int64_t n = static_cast<int64_t>(chunk.size());
        be.get_rows(ws_.h.get(), table(ws_.out.get(), U), chunk.data(), n);
        if (req.batch_invariant) be.set_rows_mode(RowsMode::as_decode);   // logits as decode, however many rows
        be.matmul(ws_.logits.get(), ws_.h.get(), output_, n);
        be.set_rows_mode(default_mode(req));
        for (int64_t j = 0; j < n; ++j)
            for (size_t i : *targets[static_cast<size_t>(j)])
                be.download(req.logits + static_cast<int64_t>(i) * V, ws_.logits.get() + j * V, static_cast<size_t>(V));
        chunk.clear();
        targets.clear();
    };
    for (const auto& [u, positions] : wanted) {
        chunk.push_back(u);
        targets.push_back(&positions);
        if (static_cast<int64_t>(chunk.size()) == std::min(kLogitRows, p.T)) flush();
    }
    if (!chunk.empty()) flush();
}

}  // namespace tmill
