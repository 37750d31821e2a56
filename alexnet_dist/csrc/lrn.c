/* ReLU + local response normalization (Krizhevsky et al. 2012, section 3.3) on the CPU, fused.
 *
 *   r_c = max(x_c, 0)                       (relu = 1; r_c = x_c when relu = 0)
 *   s_c = k + alpha * sum_{j = c-lo}^{c+hi} r_j^2     (channels past the edges count as 0)
 *   y_c = r_c * s_c^-beta
 *
 * Backward, with g = dL/dy and t_c = g_c * r_c * s_c^-beta / s_c:
 *   dx_j = [x_j > 0] * (g_j * s_j^-beta - 2 alpha beta r_j * sum_{c = j-hi}^{j+lo} t_c)
 *
 * Tensors are float32 NCHW, contiguous. Work is cut into tasks of (image, block of BLOCK pixels);
 * for each task every channel's block stays in a small per-thread buffer, so the forward pass reads x
 * once and writes y and s once, and the backward pass reads g, x, s once and writes dx once. torch's
 * own formulation (alexnet_dist.model) makes about twice as many passes over memory, and ReLU two more.
 * Loaded through ctypes by alexnet_dist/lrn_native.py, which compiles this file on first use.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 256

typedef struct {
    const float *x, *s, *g;
    float *y, *s_out, *dx;
    int64_t channels, plane, blocks, first, last; /* tasks [first, last) */
    int lo, hi, relu;
    float alpha, beta, k;
    int status;
} job_t;

/* s^-beta; beta = 0.75 (the paper's) through two square roots, which vectorise, instead of powf. */
static void neg_pow(const float *s, float *out, int64_t n, float beta) {
    if (beta == 0.75f) {
        for (int64_t i = 0; i < n; i++) {
            float r = 1.0f / sqrtf(s[i]);
            out[i] = r * sqrtf(r);
        }
    } else {
        for (int64_t i = 0; i < n; i++) out[i] = powf(s[i], -beta);
    }
}

/* Where task `task` starts (offset of channel 0) and how many pixels it covers. */
static int64_t task_span(const job_t *j, int64_t task, int64_t *len) {
    const int64_t p0 = (task % j->blocks) * BLOCK;
    *len = j->plane - p0 < BLOCK ? j->plane - p0 : BLOCK;
    return (task / j->blocks) * j->channels * j->plane + p0;
}

/* Two per-thread buffers of a channels x BLOCK tile each; on failure, frees both and flags the job. */
static int alloc_tiles(job_t *j, float **a, float **b) {
    *a = malloc(sizeof(float) * (size_t)(j->channels * BLOCK));
    *b = malloc(sizeof(float) * (size_t)(j->channels * BLOCK));
    if (*a && *b) return 1;
    free(*a);
    free(*b);
    j->status = 1;
    return 0;
}

static void *forward_tasks(void *arg) {
    job_t *j = (job_t *)arg;
    const int64_t C = j->channels, P = j->plane;
    float *sq, *pw;
    if (!alloc_tiles(j, &sq, &pw)) return NULL;
    for (int64_t task = j->first; task < j->last; task++) {
        int64_t len;
        const int64_t base = task_span(j, task, &len);
        for (int64_t c = 0; c < C; c++) {
            const float *xc = j->x + base + c * P;
            float *q = sq + c * BLOCK;
            for (int64_t i = 0; i < len; i++) {
                float r = j->relu && xc[i] < 0.0f ? 0.0f : xc[i];
                q[i] = r * r;
            }
        }
        for (int64_t c = 0; c < C; c++) {
            const int64_t a = c - j->lo < 0 ? 0 : c - j->lo, b = c + j->hi >= C ? C - 1 : c + j->hi;
            const float *xc = j->x + base + c * P;
            float *sc = j->s_out + base + c * P, *yc = j->y + base + c * P;
            for (int64_t i = 0; i < len; i++) sc[i] = 0.0f;
            for (int64_t w = a; w <= b; w++) {
                const float *q = sq + w * BLOCK;
                for (int64_t i = 0; i < len; i++) sc[i] += q[i];
            }
            for (int64_t i = 0; i < len; i++) sc[i] = j->k + j->alpha * sc[i];
            neg_pow(sc, pw, len, j->beta);
            for (int64_t i = 0; i < len; i++) {
                float r = j->relu && xc[i] < 0.0f ? 0.0f : xc[i];
                yc[i] = r * pw[i];
            }
        }
    }
    free(sq);
    free(pw);
    return NULL;
}

static void *backward_tasks(void *arg) {
    job_t *j = (job_t *)arg;
    const int64_t C = j->channels, P = j->plane;
    const float factor = -2.0f * j->alpha * j->beta;
    float *t, *pw;
    if (!alloc_tiles(j, &t, &pw)) return NULL;
    for (int64_t task = j->first; task < j->last; task++) {
        int64_t len;
        const int64_t base = task_span(j, task, &len);
        for (int64_t c = 0; c < C; c++) {
            const float *xc = j->x + base + c * P, *sc = j->s + base + c * P, *gc = j->g + base + c * P;
            float *p = pw + c * BLOCK, *tc = t + c * BLOCK;
            neg_pow(sc, p, len, j->beta);
            for (int64_t i = 0; i < len; i++) {
                float r = j->relu && xc[i] < 0.0f ? 0.0f : xc[i];
                tc[i] = gc[i] * r * p[i] / sc[i];
            }
        }
        for (int64_t c = 0; c < C; c++) {
            /* channel c is in the windows of channels c-hi .. c+lo */
            const int64_t a = c - j->hi < 0 ? 0 : c - j->hi, b = c + j->lo >= C ? C - 1 : c + j->lo;
            const float *xc = j->x + base + c * P, *gc = j->g + base + c * P, *p = pw + c * BLOCK;
            float *dc = j->dx + base + c * P;
            for (int64_t i = 0; i < len; i++) dc[i] = 0.0f;
            for (int64_t w = a; w <= b; w++) {
                const float *tw = t + w * BLOCK;
                for (int64_t i = 0; i < len; i++) dc[i] += tw[i];
            }
            for (int64_t i = 0; i < len; i++) {
                float r = j->relu && xc[i] < 0.0f ? 0.0f : xc[i];
                float d = gc[i] * p[i] + factor * r * dc[i];
                dc[i] = j->relu && xc[i] <= 0.0f ? 0.0f : d;
            }
        }
    }
    free(t);
    free(pw);
    return NULL;
}

/* Run fn over all tasks on `threads` threads (the caller's thread is one of them). 0 on success. */
static int run(void *(*fn)(void *), job_t *proto, int64_t batch, int threads) {
    const int64_t tasks = batch * proto->blocks;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (threads > tasks) threads = (int)(tasks > 0 ? tasks : 1);
    job_t jobs[64];
    pthread_t ids[64];
    int started[64] = {0};
    for (int i = 0; i < threads; i++) {
        jobs[i] = *proto;
        jobs[i].first = tasks * i / threads;
        jobs[i].last = tasks * (i + 1) / threads;
        jobs[i].status = 0;
    }
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&ids[i], NULL, fn, &jobs[i]) == 0;
    for (int i = 1; i < threads; i++)
        if (!started[i]) fn(&jobs[i]); /* could not start a thread: do its share here */
    fn(&jobs[0]);
    int status = jobs[0].status;
    for (int i = 1; i < threads; i++) {
        if (started[i]) pthread_join(ids[i], NULL);
        status |= jobs[i].status;
    }
    return status;
}

int lrn_forward(const float *x, float *y, float *s, int64_t batch, int64_t channels, int64_t plane, int size,
                float alpha, float beta, float k, int relu, int threads) {
    job_t j = {0};
    j.x = x, j.y = y, j.s_out = s, j.channels = channels, j.plane = plane;
    j.blocks = (plane + BLOCK - 1) / BLOCK, j.lo = (size - 1) / 2, j.hi = size - 1 - (size - 1) / 2;
    j.relu = relu, j.alpha = alpha, j.beta = beta, j.k = k;
    return run(forward_tasks, &j, batch, threads);
}

int lrn_backward(const float *x, const float *s, const float *g, float *dx, int64_t batch, int64_t channels,
                 int64_t plane, int size, float alpha, float beta, int relu, int threads) {
    job_t j = {0};
    j.x = x, j.s = s, j.g = g, j.dx = dx, j.channels = channels, j.plane = plane;
    j.blocks = (plane + BLOCK - 1) / BLOCK, j.lo = (size - 1) / 2, j.hi = size - 1 - (size - 1) / 2;
    j.relu = relu, j.alpha = alpha, j.beta = beta;
    return run(backward_tasks, &j, batch, threads);
}
