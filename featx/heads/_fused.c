/* The `linear` head's SGD step as one C call (featx/heads/fused.py loads it with ctypes; no Python API).

   Each worker thread sums error.T @ x over its share of the rows, a tile of TILE rows at a time: each weight load
   serves TILE dot products, each gradient update TILE rows, and the softmax runs along the tile. Then the main
   thread adds the shares and applies GridSGD's update. Threads: an OpenMP team (persistent, unlike a thread per
   call). Built with -O3 -ffast-math -fopenmp at install time; on x86-64 the hot loops are also compiled for
   AVX2 + FMA and chosen at run time (target_clones). */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define TILE 8
#define MAX_WORKERS 64

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

/* In place on a tile of logits error[outputs][TILE], per head of num_classes rows: softmax minus the one-hot of
   labels[i] for the first count columns; the other columns (no row) become 0. exp(x - max) is 2**n * exp(g),
   |g| <= ln2 / 2, by a degree-6 Taylor polynomial (relative error < 2e-7) and the exponent bits. */
static inline __attribute__((always_inline)) void softmax_minus_onehot(float *error, const int64_t *labels,
                                                                      int64_t count, int64_t outputs,
                                                                      int64_t num_classes) {
    for (int64_t head = 0; head < outputs; head += num_classes) {
        float top[TILE], total[TILE];
        for (int i = 0; i < TILE; i++) {
            top[i] = error[head * TILE + i];
            total[i] = 0.0f;
        }
        for (int64_t k = head + 1; k < head + num_classes; k++)
            for (int i = 0; i < TILE; i++) top[i] = error[k * TILE + i] > top[i] ? error[k * TILE + i] : top[i];
        for (int64_t k = head; k < head + num_classes; k++) {
            for (int i = 0; i < TILE; i++) {
                float t = error[k * TILE + i] - top[i];
                t = (t > -87.0f ? t : -87.0f) * 1.44269504088896341f;
                float n = floorf(t + 0.5f), g = (t - n) * 0.693147180559945309f;
                float p = 1.0f + g * (1.0f + g * (0.5f + g * (1.0f / 6 + g * (1.0f / 24
                                                                              + g * (1.0f / 120 + g / 720)))));
                int32_t bits = ((int32_t)n + 127) << 23;
                float power;
                memcpy(&power, &bits, sizeof power);
                error[k * TILE + i] = p * power;
                total[i] += p * power;
            }
        }
        for (int i = 0; i < TILE; i++) total[i] = 1.0f / total[i];
        for (int64_t k = head; k < head + num_classes; k++)
            for (int i = 0; i < TILE; i++) error[k * TILE + i] *= total[i];
        for (int64_t i = 0; i < count; i++) error[(head + labels[i]) * TILE + i] -= 1.0f;
    }
    for (int64_t k = 0; k < outputs; k++)
        for (int64_t i = count; i < TILE; i++) error[k * TILE + i] = 0.0f;
}

/* softmax_minus_onehot on one tile, for tests. */
void featx_softmax_minus_onehot(float *error, const int64_t *labels, int64_t count, int64_t outputs,
                                int64_t num_classes) {
    softmax_minus_onehot(error, labels, count, outputs, num_classes);
}

#define LANES 8
typedef float vec __attribute__((vector_size(4 * LANES)));  /* 8 floats: one AVX register, two SSE registers */

static inline __attribute__((always_inline)) vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) float sum(vec v) {
    float total = 0.0f;
    for (int i = 0; i < LANES; i++) total += v[i];
    return total;
}

typedef struct {
    const float *data;         /* row r is data[starts[r]:starts[r] + dim] */
    const int64_t *starts, *labels;
    int64_t first, stop, dim, outputs, num_classes;
    const float *scale, *shift; /* logits = x @ scale.T + shift */
    float *grad, *grad_sum;     /* this share's sums: [outputs][dim], [outputs] */
    float *error;               /* scratch [outputs][TILE] */
} Share;

VECTOR_CLONES static void sum_share(Share *s) {
    const int64_t dim = s->dim, outputs = s->outputs, last = s->stop - 1;
    memset(s->grad, 0, sizeof(float) * outputs * dim);
    memset(s->grad_sum, 0, sizeof(float) * outputs);
    for (int64_t r = s->first; r < s->stop; r += TILE) { /* past the share's end, its last row stands in */
        const float *x[TILE];
        for (int i = 0; i < TILE; i++) x[i] = s->data + s->starts[r + i < last ? r + i : last];
        const float *restrict x0 = x[0], *restrict x1 = x[1], *restrict x2 = x[2], *restrict x3 = x[3];
        const float *restrict x4 = x[4], *restrict x5 = x[5], *restrict x6 = x[6], *restrict x7 = x[7];
        for (int64_t j = 0; j < outputs; j++) {  /* 8 accumulators along d, one per row */
            const float *restrict w = s->scale + j * dim;
            vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
            int64_t d = 0;
            for (; d + LANES <= dim; d += LANES) {
                const vec wv = load(w + d);
                a0 += wv * load(x0 + d), a1 += wv * load(x1 + d), a2 += wv * load(x2 + d), a3 += wv * load(x3 + d);
                a4 += wv * load(x4 + d), a5 += wv * load(x5 + d), a6 += wv * load(x6 + d), a7 += wv * load(x7 + d);
            }
            float *out = s->error + j * TILE, shift = s->shift[j];
            out[0] = sum(a0), out[1] = sum(a1), out[2] = sum(a2), out[3] = sum(a3);
            out[4] = sum(a4), out[5] = sum(a5), out[6] = sum(a6), out[7] = sum(a7);
            for (; d < dim; d++) {
                out[0] += w[d] * x0[d], out[1] += w[d] * x1[d], out[2] += w[d] * x2[d], out[3] += w[d] * x3[d];
                out[4] += w[d] * x4[d], out[5] += w[d] * x5[d], out[6] += w[d] * x6[d], out[7] += w[d] * x7[d];
            }
            for (int i = 0; i < TILE; i++) out[i] += shift;
        }
        int64_t count = s->stop - r < TILE ? s->stop - r : TILE;
        softmax_minus_onehot(s->error, s->labels + r, count, outputs, s->num_classes);
        for (int64_t j = 0; j < outputs; j++) {
            const float *e = s->error + j * TILE;
            const float e0 = e[0], e1 = e[1], e2 = e[2], e3 = e[3], e4 = e[4], e5 = e[5], e6 = e[6], e7 = e[7];
            float *restrict g = s->grad + j * dim;
            s->grad_sum[j] += (e0 + e1 + e2 + e3) + (e4 + e5 + e6 + e7);
            for (int64_t d = 0; d < dim; d++)
                g[d] += (e0 * x0[d] + e1 * x1[d] + e2 * x2[d] + e3 * x3[d]) +
                        (e4 * x4[d] + e5 * x5[d] + e6 * x6[d] + e7 * x7[d]);
        }
    }
}

/* One SGD step (momentum, weight decay on weights, gradient in the standardised space) for `outputs` stacked
   softmax outputs, heads of num_classes, on `rows` rows. partial_grads [workers][outputs][dim], partial_sums
   [workers][outputs], scale [outputs][dim], shift [outputs], errors [workers][outputs][TILE]: scratch.
   Returns 0, or -1 for a bad argument. */
int featx_sgd_step(const float *data, const int64_t *starts, int64_t rows, int64_t dim, const int64_t *labels,
                   float *weight, float *bias, float *weight_velocity, float *bias_velocity, const float *mean,
                   const float *std, const float *lr, const float *decay, float lr_factor, int64_t outputs,
                   int64_t num_classes, float momentum, int workers, float *partial_grads, float *partial_sums,
                   float *scale, float *shift, float *errors) {
    if (rows < 1 || dim < 1 || num_classes < 1 || outputs % num_classes || workers < 1 || workers > MAX_WORKERS)
        return -1;
    for (int64_t j = 0; j < outputs; j++) {
        float total = bias[j];
        for (int64_t d = 0; d < dim; d++) {
            scale[j * dim + d] = weight[j * dim + d] / std[d];
            total -= scale[j * dim + d] * mean[d];
        }
        shift[j] = total;
    }
    if (workers > rows) workers = (int)rows;
#pragma omp parallel num_threads(workers)
    {
        const int w = omp_get_thread_num(), team = omp_get_num_threads();
        for (int share = w; share < workers; share += team) {
            Share mine = {data, starts, labels, share * rows / workers, (share + 1) * rows / workers, dim, outputs,
                          num_classes, scale, shift, partial_grads + share * outputs * dim,
                          partial_sums + share * outputs, errors + share * outputs * TILE};
            sum_share(&mine);
        }
    }
    for (int64_t j = 0; j < outputs; j++) {
        float *grad = partial_grads + j * dim, bias_grad = partial_sums[j];
        for (int w = 1; w < workers; w++) {
            bias_grad += partial_sums[w * outputs + j];
            const float *other = partial_grads + (w * outputs + j) * dim;
            for (int64_t d = 0; d < dim; d++) grad[d] += other[d];
        }
        bias_grad /= rows;
        const float step = lr_factor * lr[j];
        for (int64_t d = 0; d < dim; d++) {
            float g = (grad[d] / rows - bias_grad * mean[d]) / std[d] + decay[j] * weight[j * dim + d];
            weight_velocity[j * dim + d] = momentum * weight_velocity[j * dim + d] + g;
            weight[j * dim + d] -= step * weight_velocity[j * dim + d];
        }
        bias_velocity[j] = momentum * bias_velocity[j] + bias_grad;
        bias[j] -= step * bias_velocity[j];
    }
    return 0;
}

/* out[i] = data[starts[i]:starts[i] + dim], i < n. */
void featx_gather_rows(const float *data, const int64_t *starts, int64_t n, int64_t dim, float *out) {
    for (int64_t i = 0; i < n; i++) memcpy(out + i * dim, data + starts[i], sizeof(float) * dim);
}
