/* ReLU + local response normalization (Krizhevsky et al. 2012, section 3.3) on the CPU, fused.
 *
 *   r_c = max(x_c, 0)                       (relu = 1; r_c = x_c when relu = 0)
 *   s_c = k + alpha * sum_{j = c-lo}^{c+hi} r_j^2     (channels past the edges count as 0)
 *   y_c = r_c * s_c^-beta
 *
 * Backward, with g = dL/dy and t_c = g_c * r_c * s_c^-beta / s_c:
 *   dx_j = [x_j > 0] * (g_j * s_j^-beta - 2 alpha beta r_j * sum_{c = j-hi}^{j+lo} t_c)
 *
 * Tensors are float32 NCHW, contiguous. Work is cut into tasks of (image, block of pixels); a task keeps
 * every channel's block in small per-thread tiles (a few tens of KB, in L2), so the forward pass reads x
 * and writes y once, and the backward pass reads x and g and writes dx once. s is recomputed backward
 * rather than stored: the window sums are cheap, and memory traffic is what this op costs on a CPU.
 * torch's own formulation (alexnet_dist.model) makes about three times as many passes, and ReLU two more.
 * Loaded through ctypes by alexnet_dist/lrn_native.py, which compiles this file on first use.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define TILE_FLOATS 8192 /* one channels x block tile: 32 KB */
#define MAX_THREADS 64

typedef struct {
    const float *x, *g;
    float *y, *dx;
    int64_t channels, plane, block, blocks, first, last; /* tasks [first, last) */
    int lo, hi, relu;
    float alpha, beta, k;
    int status;
} job_t;

static inline float relu_of(const job_t *j, float v) { return j->relu && v < 0.0f ? 0.0f : v; }

/* Where task `task` starts (offset of channel 0) and how many pixels it covers. */
static int64_t task_span(const job_t *j, int64_t task, int64_t *len) {
    const int64_t p0 = (task % j->blocks) * j->block;
    *len = j->plane - p0 < j->block ? j->plane - p0 : j->block;
    return (task / j->blocks) * j->channels * j->plane + p0;
}

/* `count` tiles of channels x block floats; on failure frees what it got and flags the job. */
static float *alloc_tiles(job_t *j, int count) {
    float *t = malloc(sizeof(float) * (size_t)(count * j->channels * j->block));
    if (!t) j->status = 1;
    return t;
}

/* sq[c] = r_c^2 for every channel of the task's block. */
static void squares(const job_t *j, int64_t base, int64_t len, float *sq) {
    for (int64_t c = 0; c < j->channels; c++) {
        const float *xc = j->x + base + c * j->plane;
        float *q = sq + c * j->block;
        for (int64_t i = 0; i < len; i++) {
            const float r = relu_of(j, xc[i]);
            q[i] = r * r;
        }
    }
}

/* s = k + alpha * (window sum of sq around channel c), and p = s^-beta (beta = 0.75, the paper's,
 * through two square roots, which vectorise, instead of powf). */
static void scale(const job_t *j, const float *sq, int64_t c, int64_t len, float *s, float *p) {
    const int64_t a = c - j->lo < 0 ? 0 : c - j->lo;
    const int64_t b = c + j->hi >= j->channels ? j->channels - 1 : c + j->hi;
    for (int64_t i = 0; i < len; i++) s[i] = 0.0f;
    for (int64_t w = a; w <= b; w++) {
        const float *q = sq + w * j->block;
        for (int64_t i = 0; i < len; i++) s[i] += q[i];
    }
    for (int64_t i = 0; i < len; i++) s[i] = j->k + j->alpha * s[i];
    if (j->beta == 0.75f) {
        for (int64_t i = 0; i < len; i++) {
            const float r = 1.0f / sqrtf(s[i]);
            p[i] = r * sqrtf(r);
        }
    } else {
        for (int64_t i = 0; i < len; i++) p[i] = powf(s[i], -j->beta);
    }
}

static void *forward_tasks(void *arg) {
    job_t *j = (job_t *)arg;
    float *sq = alloc_tiles(j, 1), *s = malloc(sizeof(float) * (size_t)(2 * j->block));
    if (!sq || !s) {
        free(sq);
        free(s);
        j->status = 1;
        return NULL;
    }
    float *p = s + j->block;
    for (int64_t task = j->first; task < j->last; task++) {
        int64_t len;
        const int64_t base = task_span(j, task, &len);
        squares(j, base, len, sq);
        for (int64_t c = 0; c < j->channels; c++) {
            const float *xc = j->x + base + c * j->plane;
            float *yc = j->y + base + c * j->plane;
            scale(j, sq, c, len, s, p);
            for (int64_t i = 0; i < len; i++) yc[i] = relu_of(j, xc[i]) * p[i];
        }
    }
    free(sq);
    free(s);
    return NULL;
}

static void *backward_tasks(void *arg) {
    job_t *j = (job_t *)arg;
    const int64_t C = j->channels, B = j->block, P = j->plane;
    const float factor = -2.0f * j->alpha * j->beta;
    float *tiles = alloc_tiles(j, 3), *s = malloc(sizeof(float) * (size_t)B);
    if (!tiles || !s) {
        free(tiles);
        free(s);
        j->status = 1;
        return NULL;
    }
    float *sq = tiles, *t = tiles + C * B, *pw = tiles + 2 * C * B;
    for (int64_t task = j->first; task < j->last; task++) {
        int64_t len;
        const int64_t base = task_span(j, task, &len);
        squares(j, base, len, sq);
        for (int64_t c = 0; c < C; c++) {
            const float *xc = j->x + base + c * P, *gc = j->g + base + c * P;
            float *p = pw + c * B, *tc = t + c * B;
            scale(j, sq, c, len, s, p);
            for (int64_t i = 0; i < len; i++) tc[i] = gc[i] * relu_of(j, xc[i]) * p[i] / s[i];
        }
        for (int64_t c = 0; c < C; c++) {
            /* channel c is in the windows of channels c-hi .. c+lo */
            const int64_t a = c - j->hi < 0 ? 0 : c - j->hi, b = c + j->lo >= C ? C - 1 : c + j->lo;
            const float *xc = j->x + base + c * P, *gc = j->g + base + c * P, *p = pw + c * B;
            float *dc = j->dx + base + c * P;
            for (int64_t i = 0; i < len; i++) dc[i] = 0.0f;
            for (int64_t w = a; w <= b; w++) {
                const float *tw = t + w * B;
                for (int64_t i = 0; i < len; i++) dc[i] += tw[i];
            }
            for (int64_t i = 0; i < len; i++) {
                const float d = gc[i] * p[i] + factor * relu_of(j, xc[i]) * dc[i];
                dc[i] = j->relu && xc[i] <= 0.0f ? 0.0f : d;
            }
        }
    }
    free(tiles);
    free(s);
    return NULL;
}

/* Run fn over all tasks on `threads` threads (the caller's thread is one of them). 0 on success. */
static int run(void *(*fn)(void *), job_t *proto, int64_t batch, int threads) {
    /* pixels per task: a tile of all channels stays near TILE_FLOATS, a multiple of 16 (vector width) */
    int64_t block = (TILE_FLOATS / (proto->channels > 0 ? proto->channels : 1)) & ~(int64_t)15;
    proto->block = block < 16 ? 16 : block > proto->plane ? proto->plane : block;
    proto->blocks = (proto->plane + proto->block - 1) / proto->block;
    const int64_t tasks = batch * proto->blocks;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > tasks) threads = (int)(tasks > 0 ? tasks : 1);
    job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
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

static job_t make_job(int64_t channels, int64_t plane, int size, float alpha, float beta, float k, int relu) {
    job_t j = {0};
    j.channels = channels, j.plane = plane, j.lo = (size - 1) / 2, j.hi = size - 1 - (size - 1) / 2;
    j.relu = relu, j.alpha = alpha, j.beta = beta, j.k = k;
    return j;
}

int lrn_forward(const float *x, float *y, int64_t batch, int64_t channels, int64_t plane, int size, float alpha,
                float beta, float k, int relu, int threads) {
    job_t j = make_job(channels, plane, size, alpha, beta, k, relu);
    j.x = x, j.y = y;
    return run(forward_tasks, &j, batch, threads);
}

int lrn_backward(const float *x, const float *g, float *dx, int64_t batch, int64_t channels, int64_t plane,
                 int size, float alpha, float beta, float k, int relu, int threads) {
    job_t j = make_job(channels, plane, size, alpha, beta, k, relu);
    j.x = x, j.g = g, j.dx = dx;
    return run(backward_tasks, &j, batch, threads);
}
