/* Overlapping max-pooling (Krizhevsky et al. 2012, section 3.4) on the CPU: forward and backward.
 *
 * torch's CPU max_pool2d branches on every comparison (mispredicted half the time on real activations)
 * and stores an int64 index per output. Here the window's argmax is one byte (its position
 * kh * k + kw in the window) and an output row is computed as k * k passes of strided loads over the
 * row, which the compiler vectorises.
 *
 * Same numbers as torch, bit for bit: the window is scanned in row-major order and an element replaces
 * the running maximum when it is greater or NaN (torch's rule), so ties and NaNs pick the same element
 * and the gradient goes to the same place. Built without -ffast-math: the NaN test must stay.
 *
 * Tensors are float32 NCHW, contiguous; no padding, floor mode. Planes (image x channel) are split across
 * threads; a plane is one thread's, so backward's overlapping windows accumulate without races.
 * Loaded through ctypes by alexnet_dist/maxpool_native.py, which compiles this file on first use.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64

typedef struct {
    const float *x, *gy;
    float *y, *gx;
    uint8_t *idx;
    int64_t first, last; /* planes [first, last) */
    int h, w, oh, ow, k, s;
    int status; /* 1: out of memory */
} job_t;

#define CHUNK 2048 /* outputs folded at once: several small planes together, so the vector loops run long */

/* best[i] takes v[i] where v[i] is greater or NaN (torch's rule), and at[i] records `pos` there.
 * Written over long arrays so the compiler makes it compares and blends: a branch per element would
 * mispredict half the time on real activations. */
static inline void fold(float *restrict best, uint8_t *restrict at, const float *restrict v, int64_t n,
                        uint8_t pos) {
    for (int64_t i = 0; i < n; i++) {
        const float x = v[i], b = best[i];
        const int take = (x > b) | (x != x);
        best[i] = take ? x : b;
        at[i] = take ? pos : at[i];
    }
}

/* cols[q, oy, ox] = x[q, oy*s + kh, ox*s + kw] for `count` planes: one window position of every output. */
static void gather(float *restrict cols, const float *restrict x, int64_t count, const job_t *j, int kh, int kw) {
    const int w = j->w, oh = j->oh, ow = j->ow, s = j->s;
    const int64_t in = (int64_t)j->h * w;
    for (int64_t q = 0; q < count; q++) {
        for (int oy = 0; oy < oh; oy++) {
            const float *row = x + q * in + ((int64_t)oy * s + kh) * w + kw;
            float *dst = cols + (q * oh + oy) * ow;
            if (s == 2)
                for (int ox = 0; ox < ow; ox++) dst[ox] = row[2 * ox];
            else
                for (int ox = 0; ox < ow; ox++) dst[ox] = row[(int64_t)ox * s];
        }
    }
}

static void forward_planes(job_t *j) {
    const int k = j->k;
    const int64_t in = (int64_t)j->h * j->w, out = (int64_t)j->oh * j->ow;
    const int64_t per = out >= CHUNK ? 1 : CHUNK / out; /* planes a pass */
    float *cols = malloc(sizeof(float) * (size_t)(per * out));
    if (!cols) {
        j->status = 1;
        return;
    }
    for (int64_t p = j->first; p < j->last; p += per) {
        const int64_t count = j->last - p < per ? j->last - p : per, n = count * out;
        float *m = j->y + p * out;
        uint8_t *id = j->idx + p * out;
        for (int kh = 0; kh < k; kh++) {
            for (int kw = 0; kw < k; kw++) {
                if (kh == 0 && kw == 0) {
                    gather(m, j->x + p * in, count, j, 0, 0);
                    memset(id, 0, (size_t)n);
                } else {
                    gather(cols, j->x + p * in, count, j, kh, kw);
                    fold(m, id, cols, n, (uint8_t)(kh * k + kw));
                }
            }
        }
    }
    free(cols);
}

static void backward_planes(job_t *j) {
    const int w = j->w, oh = j->oh, ow = j->ow, s = j->s;
    const int64_t in = (int64_t)j->h * w, out = (int64_t)oh * ow;
    int64_t offset[15 * 15]; /* window position -> offset from the window's top-left element */
    for (int at = 0; at < j->k * j->k; at++) offset[at] = (int64_t)(at / j->k) * w + at % j->k;
    for (int64_t p = j->first; p < j->last; p++) {
        float *gx = j->gx + p * in;
        const float *gy = j->gy + p * out;
        const uint8_t *id = j->idx + p * out;
        memset(gx, 0, sizeof(float) * (size_t)in);
        for (int oy = 0; oy < oh; oy++) {
            float *top = gx + (int64_t)oy * s * w;
            const float *g = gy + (int64_t)oy * ow;
            const uint8_t *at = id + (int64_t)oy * ow;
            for (int ox = 0; ox < ow; ox++) top[(int64_t)ox * s + offset[at[ox]]] += g[ox];
        }
    }
}

static void *forward_thread(void *arg) {
    forward_planes(arg);
    return NULL;
}

static void *backward_thread(void *arg) {
    backward_planes(arg);
    return NULL;
}

/* Runs fn over `planes` planes in up to `threads` threads (the caller's thread takes the first share). */
/* Returns 1 when a share failed (out of memory), else 0. */
static int run(job_t base, int64_t planes, int threads, void (*fn)(job_t *), void *(*thread)(void *)) {
    job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const int64_t per = (int64_t)base.h * base.w;
    const int64_t cap = planes * per / 262144 + 1; /* starting a thread costs: give each >= 256K inputs */
    if (threads > cap) threads = (int)cap;
    if (threads > planes) threads = (int)planes;
    if (threads < 1) threads = 1;
    for (int t = 0; t < threads; t++) {
        jobs[t] = base;
        jobs[t].first = planes * t / threads;
        jobs[t].last = planes * (t + 1) / threads;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, thread, &jobs[t]) == 0;
    fn(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            fn(&jobs[t]); /* no thread to be had: do its share here */
    }
    int status = 0;
    for (int t = 0; t < threads; t++) status |= jobs[t].status;
    return status;
}

/* y = maxpool(x), idx = each output's position in its window. 0 on success, 1 on bad sizes, 2 out of memory. */
int maxpool_forward(const float *x, float *y, uint8_t *idx, int64_t planes, int h, int w, int k, int s,
                    int threads) {
    if (k < 1 || k > 15 || s < 1 || h < k || w < k ) return 1;
    job_t j = {.x = x, .y = y, .idx = idx, .h = h, .w = w, .k = k, .s = s};
    j.oh = (h - k) / s + 1, j.ow = (w - k) / s + 1;
    return run(j, planes, threads, forward_planes, forward_thread) ? 2 : 0;
}

/* gx = the gradient of maxpool at x, given gy and the forward's idx. 0 on success, 1 on bad sizes. */
int maxpool_backward(const float *gy, const uint8_t *idx, float *gx, int64_t planes, int h, int w, int k, int s,
                     int threads) {
    if (k < 1 || k > 15 || s < 1 || h < k || w < k) return 1;
    job_t j = {.gy = gy, .gx = gx, .idx = (uint8_t *)idx, .h = h, .w = w, .k = k, .s = s};
    j.oh = (h - k) / s + 1, j.ow = (w - k) / s + 1;
    return run(j, planes, threads, backward_planes, backward_thread) ? 2 : 0;
}
