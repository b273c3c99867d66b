/* Python -> core crossing counters (see _core_py.CROSSINGS).
 *
 * Built with -DFASTGATE_DEBUG (FASTGATE_DEBUG=1 python setup.py build_ext):
 * FG_CROSS(i) adds one to a per-process table; otherwise it expands to
 * nothing, so the normal build does not even evaluate its argument. */
#ifndef FG_DEBUG_H
#define FG_DEBUG_H

#include <stdint.h>
#include <string.h>

#define FG_NCROSS 128

#ifdef FASTGATE_DEBUG
static uint64_t fg_crossings[FG_NCROSS];
#define FG_COUNTS_CROSSINGS 1
#define FG_CROSS(i) ((void)(fg_crossings[(i)]++))
static inline uint64_t fg_cross_get(int i) { return fg_crossings[i]; }
static inline void fg_cross_reset(void) { memset(fg_crossings, 0, sizeof(fg_crossings)); }
#else
#define FG_COUNTS_CROSSINGS 0
#define FG_CROSS(i) ((void)0)
static inline uint64_t fg_cross_get(int i) { (void)i; return 0; }
static inline void fg_cross_reset(void) {}
#endif

#endif
