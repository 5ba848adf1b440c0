// libFuzzer target: a model built from a parsed GGUF file (hyper-parameters, tensor names, shapes and
// types checked against each other, weights handed to the CPU backend), then two forward passes of
// two tokens each through a small cache, so every weight the model accepted is really read.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "io/gguf.h"
#include "model/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace tmill;
    try {
        GGUFFile f(MappedFile::from_bytes(data, size, "fuzz.gguf"));
        LoadOptions options;
        options.backend.n_threads = 1;
        auto model = Model::from_gguf(f, options);
        const int64_t V = model->hparams().n_vocab;
        auto cache = std::make_shared<KVCache>(model, 8, KVCacheConfig{}, 0);
        std::vector<int32_t> ids = {0, static_cast<int32_t>(V - 1)};
        std::vector<float> logits(static_cast<size_t>(2 * V)), hidden(static_cast<size_t>(model->hparams().n_embd));
        for (int pass = 0; pass < 2; ++pass) {
            ForwardRequest req;
            req.batch.push_back({cache.get(), ids.data(), nullptr, 2, -1});
            req.logit_rows = {0, 1};
            req.logits = logits.data();
            req.hidden_rows = {1};
            req.hidden = hidden.data();
            model->forward(req);
        }
    } catch (const Error&) {
    }
    return 0;
}
