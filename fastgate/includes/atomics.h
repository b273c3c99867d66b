/* GCC/Clang __atomic wrappers for fastgate/_core.pyx.
 *
 * Every access to a word that another process may write at the same time goes
 * through one of these, so the memory order is spelled out at each call site.
 * All words are naturally aligned inside the arena (the layout guarantees it),
 * so 32- and 64-bit atomics are lock-free on every target we build for.
 */
#ifndef FASTGATE_ATOMICS_H
#define FASTGATE_ATOMICS_H

#include <stdint.h>

static inline uint32_t fg_load32_acq(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t fg_load32_rlx(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void fg_store32_rel(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void fg_store32_rlx(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static inline uint64_t fg_load64_acq(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t fg_load64_rlx(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void fg_store64_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void fg_store64_rlx(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint64_t fg_add64(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }

/* Strong CAS; on failure *expected receives the current value. */
static inline int fg_cas64(uint64_t *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static inline void fg_fence_acq(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void fg_fence_rel(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

/* Monotonic nanoseconds: readers that meet a record mid-write wait by time,
 * not by a spin count whose length depends on the CPU. */
#include <time.h>
static inline int64_t fg_mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void fg_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif
