/* LD_PRELOAD shim for tests: shifts the process's wall clock (CLOCK_REALTIME, gettimeofday, time) by
 * MUTUAL_TEST_CLOCK_SHIFT seconds (may be negative); monotonic clocks are untouched, as on a host whose wall clock is
 * wrong. Written here because libfaketime breaks argument passing to Swift binaries on Linux. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long shift_seconds(void) {
    static long shift = 0;
    static int ready = 0;
    if (!ready) {
        const char *text = getenv("MUTUAL_TEST_CLOCK_SHIFT");
        shift = text ? strtol(text, NULL, 10) : 0;
        ready = 1;
    }
    return shift;
}

static int realtime(clockid_t id) {
    return id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE
#ifdef CLOCK_REALTIME_ALARM
        || id == CLOCK_REALTIME_ALARM
#endif
#ifdef CLOCK_TAI
        || id == CLOCK_TAI
#endif
        ;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *) = NULL;
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int result = real(id, ts);
    if (result == 0 && ts && realtime(id)) ts->tv_sec += shift_seconds();
    return result;
}

int gettimeofday(struct timeval *tv, void *tz) {
    static int (*real)(struct timeval *, void *) = NULL;
    if (!real) real = (int (*)(struct timeval *, void *))dlsym(RTLD_NEXT, "gettimeofday");
    int result = real(tv, tz);
    if (result == 0 && tv) tv->tv_sec += shift_seconds();
    return result;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
