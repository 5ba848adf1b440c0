// tokenmill-bench: prompt-processing (-p) and generation (-n) throughput of a GGUF model, in the
// spirit of llama-bench. Every test runs -r times on a fresh cache; the table shows mean ± sd.
//
//   tokenmill-bench -m model.gguf [-p 128,512] [-n 64] [-t 1,2] [-r 5] [-d 0,2048]
//                   [-ctk fp32,q8] [-ctv fp32,q8] [-o md|json]
//
// -ctk / -ctv list KV cache kinds (fp32 fp16 bf16 q8 q4 nf4); each K kind runs with the V kind at the
// same list position (the last one repeats), so "-ctk fp16,q8 -ctv fp16,q8" measures two caches.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "kv/kv_cache.h"
#include "model/model.h"
#include "core/threadpool.h"

using namespace tmill;

namespace {

struct Options {
    std::string model;
    std::vector<int> prompt = {128};
    std::vector<int> gen = {64};
    std::vector<int> threads = {default_thread_count()};
    std::vector<int> depth = {0};
    std::vector<std::string> cache_k = {"fp32"};
    std::vector<std::string> cache_v;   // empty: same as cache_k
    int reps = 5;
    bool json = false;
    bool int8_prefill = false;   // -i8p 1: LoadOptions::int8_prefill
    std::string device = "cpu";  // -dev cuda|hip|cpu: BackendOptions::device
};

std::vector<std::string> parse_names(const char* s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) out.push_back(item);
    return out;
}

std::vector<int> parse_list(const char* s) {
    std::vector<int> out;
    for (const std::string& item : parse_names(s)) out.push_back(std::atoi(item.c_str()));
    return out;
}

[[noreturn]] void usage() {
    std::fprintf(stderr,
                 "usage: tokenmill-bench -m MODEL.gguf [-p N,..] [-n N,..] [-t THREADS,..] [-d DEPTH,..] [-r REPS] "
                 "[-ctk KIND,..] [-ctv KIND,..] [-i8p 0|1] [-dev cpu|cuda|hip] [-o md|json]\n");
    std::exit(2);
}

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (i + 1 >= argc) usage();
        const char* v = argv[++i];
        if (a == "-m") o.model = v;
        else if (a == "-p") o.prompt = parse_list(v);
        else if (a == "-n") o.gen = parse_list(v);
        else if (a == "-t") o.threads = parse_list(v);
        else if (a == "-d") o.depth = parse_list(v);
        else if (a == "-r") o.reps = std::atoi(v);
        else if (a == "-ctk") o.cache_k = parse_names(v);
        else if (a == "-ctv") o.cache_v = parse_names(v);
        else if (a == "-o") o.json = std::string(v) == "json";
        else if (a == "-i8p") o.int8_prefill = std::atoi(v) != 0;
        else if (a == "-dev") o.device = v;
        else usage();
    }
    if (o.model.empty() || o.reps < 1 || o.cache_k.empty()) usage();
    return o;
}

double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Seconds to run `n` tokens after `depth` tokens of context: as one prompt, or one token at a time.
double run_once(Model& m, const KVCacheConfig& kv, int depth, int n, bool prompt) {
    const HParams& hp = m.hparams();
    KVCache cache(m.shared_from_this(), depth + n + 1, kv);
    std::vector<int32_t> ids(static_cast<size_t>(depth + n));
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 2654435761u) % hp.n_vocab);
    std::vector<float> logits(static_cast<size_t>(hp.n_vocab));
    // the tokens [start, start + count) as one pass with the logits of its last row
    auto run = [&](int start, int count) {
        ForwardRequest req;
        SequenceInput in;
        in.cache = &cache;
        in.tokens = ids.data() + start;
        in.n = count;
        req.batch.push_back(in);
        req.logit_rows = {count - 1};
        req.logits = logits.data();
        m.forward(req);
    };
    if (depth > 0) run(0, depth);
    double t0 = now();
    if (prompt) {
        run(depth, n);
    } else {
        for (int i = 0; i < n; ++i) run(depth + i, 1);
    }
    return now() - t0;
}

}  // namespace

int main(int argc, char** argv) {
    Options o = parse(argc, argv);
    try {
        bool first = true;
        std::vector<KVCacheConfig> caches;
        for (size_t i = 0; i < o.cache_k.size(); ++i) {
            const std::vector<std::string>& vs = o.cache_v.empty() ? o.cache_k : o.cache_v;
            KVCacheConfig c;
            c.k_type = kv_type_from_name(o.cache_k[i]);
            c.v_type = kv_type_from_name(vs[std::min(i, vs.size() - 1)]);
            caches.push_back(c);
        }
        if (o.json) std::printf("[\n");
        else std::printf("| model | size | params | backend | threads | kv | test | t/s |\n|---|---:|---:|---|---:|---|---|---:|\n");
        for (int threads : o.threads) {
            LoadOptions load;
            load.backend.n_threads = threads;
            load.backend.int8_prefill = o.int8_prefill;
            load.backend.device = o.device;
            auto model = Model::from_gguf(o.model, load);
            std::string name = o.model.substr(o.model.find_last_of('/') + 1);
            double size_mib = static_cast<double>(model->weight_bytes()) / (1 << 20);
            double params_m = static_cast<double>(model->n_params()) / 1e6;
            for (const KVCacheConfig& kv : caches)
            for (int depth : o.depth) {
                std::string kv_name = kv_type_name(kv.k_type) + "/" + kv_type_name(kv.v_type);
                std::vector<std::pair<std::string, std::pair<int, bool>>> tests;
                for (int p : o.prompt) if (p > 0) tests.push_back({"pp" + std::to_string(p), {p, true}});
                for (int n : o.gen) if (n > 0) tests.push_back({"tg" + std::to_string(n), {n, false}});
                for (auto& [label, spec] : tests) {
                    auto [n, prompt] = spec;
                    run_once(*model, kv, depth, prompt ? n : 4, prompt);   // warm-up
                    std::vector<double> tps;
                    for (int r = 0; r < o.reps; ++r) tps.push_back(n / run_once(*model, kv, depth, n, prompt));
                    double mean = 0, sd = 0;
                    for (double v : tps) mean += v;
                    mean /= tps.size();
                    for (double v : tps) sd += (v - mean) * (v - mean);
                    sd = tps.size() > 1 ? std::sqrt(sd / (tps.size() - 1)) : 0.0;
                    std::string test = depth > 0 ? label + " @ d" + std::to_string(depth) : label;
                    std::string backend = model->backend().name();
                    if (o.json) {
                        std::printf("%s  {\"model\": \"%s\", \"size_mib\": %.2f, \"params_m\": %.2f, \"backend\": \"%s\", "
                                    "\"threads\": %d, \"kv\": \"%s\", \"test\": \"%s\", \"n\": %d, \"depth\": %d, \"tps_mean\": %.3f, "
                                    "\"tps_sd\": %.3f, \"samples\": [",
                                    first ? "" : ",\n", name.c_str(), size_mib, params_m, backend.c_str(), threads,
                                    kv_name.c_str(), label.c_str(), n, depth, mean, sd);
                        for (size_t i = 0; i < tps.size(); ++i) std::printf("%s%.3f", i ? ", " : "", tps[i]);
                        std::printf("]}");
                    } else {
                        std::printf("| %s | %.2f MiB | %.2f M | %s | %d | %s | %s | %.2f ± %.2f |\n", name.c_str(),
                                    size_mib, params_m, backend.c_str(), threads, kv_name.c_str(), test.c_str(),
                                    mean, sd);
                    }
                    std::fflush(stdout);
                    first = false;
                }
            }
        }
        if (o.json) std::printf("\n]\n");
    } catch (const Error& e) {
        std::fprintf(stderr, "tokenmill-bench: %s\n", e.what());
        return 1;
    }
    return 0;
}
