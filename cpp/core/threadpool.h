// A persistent pool: the caller is thread 0, n_threads-1 workers wait for work. Workers spin briefly
// before sleeping, because a decode step issues hundreds of short parallel regions and waking a
// sleeping thread costs more than most of them.
#pragma once

#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace tmill {

// One turn of a spin-wait: tells the core (and its hyperthread sibling) that this thread only waits.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
}

// Thread t's contiguous share [first, second) of n items split evenly over n_threads (a region whose
// threads take fixed shares rather than chunks from a shared counter).
inline std::pair<int64_t, int64_t> fixed_share(int64_t n, int t, int n_threads) {
    return {n * t / n_threads, n * (t + 1) / n_threads};
}

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }

    // Runs fn(thread_index) on every thread (the caller is index 0) and returns when all are done.
    // Not reentrant: one region at a time per pool (the model serialises its forward passes).
    // An exception thrown on any thread is rethrown here, in the caller, once all are done.
    void run(const std::function<void(int)>& fn);

    // Splits [0, n) into contiguous chunks (chunks_per_thread per thread) taken by the threads as
    // they free up: fn(begin, end, thread_index), possibly several calls per thread.
    void parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn, int chunks_per_thread = 8);

private:
    void worker_loop(int index);
    void run_guarded(const std::function<void(int)>& fn, int index);

    int n_threads_;
    std::vector<std::thread> workers_;
    const std::function<void(int)>* job_ = nullptr;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    std::atomic<bool> stop_{false};
    std::atomic<bool> failed_{false};   // a thread of the current region threw: the others stop early
    std::exception_ptr error_;          // the first exception of the current region
    std::mutex mutex_;
    std::condition_variable wake_;
};

// Physical cores when the OS tells us (hyperthreads add little to bandwidth-bound decode).
int default_thread_count();
// CPUs this process may run on (its affinity mask): more threads than this only spin against each other.
int available_cpus();

}  // namespace tmill
