#include "core/threadpool.h"

#include <algorithm>
#include <fstream>
#include <sched.h>
#include <set>
#include <string>
#include <utility>

namespace tmill {

namespace {
constexpr int kSpinIterations = 1 << 15;
}

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (std::thread& t : workers_) t.join();
}

void ThreadPool::worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
        int spins = 0;
        while (generation_.load(std::memory_order_acquire) == seen && spins < kSpinIterations) {
            cpu_relax();
            ++spins;
        }
        if (generation_.load(std::memory_order_acquire) == seen) {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
        seen = generation_.load(std::memory_order_acquire);
        if (stop_.load()) return;
        run_guarded(*job_, index);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

void ThreadPool::run_guarded(const std::function<void(int)>& fn, int index) {
    try {
        fn(index);
    } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
        failed_.store(true, std::memory_order_release);
    }
}

void ThreadPool::run(const std::function<void(int)>& fn) {
    if (n_threads_ == 1) {
        fn(0);
        return;
    }
    error_ = nullptr;
    failed_.store(false, std::memory_order_relaxed);
    job_ = &fn;
    pending_.store(n_threads_ - 1, std::memory_order_release);
    {
        // Taking the lock orders the bump against a worker that is about to sleep.
        std::lock_guard<std::mutex> lock(mutex_);
        generation_.fetch_add(1, std::memory_order_acq_rel);
    }
    wake_.notify_all();
    run_guarded(fn, 0);
    while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
    if (failed_.load(std::memory_order_acquire)) {
        std::exception_ptr error;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            std::swap(error, error_);
        }
        std::rethrow_exception(error);
    }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn, int chunks_per_thread) {
    if (n <= 0) return;
    if (n_threads_ == 1 || n == 1) {
        fn(0, n, 0);
        return;
    }
    // Chunks handed out on demand: a thread that started late or runs slower takes fewer, so
    // nobody waits long at the end of a region.
    const int64_t n_chunks = std::min<int64_t>(n, static_cast<int64_t>(n_threads_) * chunks_per_thread);
    std::atomic<int64_t> next{0};
    run([&](int t) {
        for (int64_t c = next.fetch_add(1, std::memory_order_relaxed);
             c < n_chunks && !failed_.load(std::memory_order_relaxed); c = next.fetch_add(1, std::memory_order_relaxed))
            fn(n * c / n_chunks, n * (c + 1) / n_chunks, t);
    });
}

int default_thread_count() {
    // Count distinct (physical id, core id) pairs; fall back to the logical count.
    std::ifstream cpuinfo("/proc/cpuinfo");
    std::set<std::pair<std::string, std::string>> cores;
    std::string line, physical = "0";
    while (std::getline(cpuinfo, line)) {
        auto value = [&] { return line.substr(line.find(':') + 1); };
        if (line.rfind("physical id", 0) == 0) physical = value();
        if (line.rfind("core id", 0) == 0) cores.emplace(physical, value());
    }
    unsigned logical = std::thread::hardware_concurrency();
    int n = cores.empty() ? static_cast<int>(logical) : static_cast<int>(cores.size());
    return std::max(1, std::min(n, available_cpus()));
}

int available_cpus() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

}  // namespace tmill
