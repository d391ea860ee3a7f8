/* A decode step's work on a few rows of fp32, on the CPU, beside torch (kernels/rows.py): the
 * products by the weight matrices and the RMS norms before them.
 *
 * linear_rows: x [M, K] @ w [K, N] -> out [M, N], w in model.py fuse_projections' layout ([in,
 * out] contiguous). For a few rows the product is a read of w, and its speed that of the read.
 * MKL's one-row products (x @ w, F.linear, addmm, mv alike) read SmolLM2-135M's weights at 17 GB/s,
 * below a plain sum's 18 GB/s, and its cost grows with the rows; this kernel reads them at 22 GB/s
 * (2-core AMD EPYC, one thread, CPU time per decode step's 538 MB, load 2.8):
 *     rows            1      2      3      4      8
 *     MKL x @ w    31.9   50.9   65.3   72.7   83.2 ms
 *     linear_rows  24.4   31.4   34.1   37.1   53.3 ms
 * Beyond 8 rows MKL catches up (16: 104 against 86 ms; 32: 146 against 161).
 *
 * One core reads memory faster from several streams far apart than from one (a sum over 512 MB:
 * about 19 GB/s from one stream, 24 from 4, 27 from 8), so the K rows of w are read as STREAMS
 * runs of K / STREAMS rows each, in step: each pass over the columns adds STREAMS rows, one from
 * each run, into the output. Every row is read whole and in order, the output stays in cache, and
 * each of its loads and stores serves STREAMS multiply-adds (4 streams: no faster; 16: 15% slower;
 * software prefetches: 20% slower).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define STREAMS 8
#define COLUMNS 256  /* columns per pass over the M rows: STREAMS rows of them stay in L1 meanwhile */

/* out = x @ w, x's rows x_stride apart. One thread, whatever torch's count: with two, on the
 * 2-core EPYC measured (load 3.6: the threads mostly shared one core), a decode step took 102 ms
 * wall with w's rows split between them, against 66 on one thread and 70 for MKL, which keeps
 * these products on one thread as well; split by columns, each thread reading short pieces of
 * every row, the products alone took 32 ms at best, against 23 on one thread. */
void linear_rows(int M, int K, int N, const float *restrict x, int64_t x_stride, const float *restrict w,
                 float *restrict out) {
    const int run = K / STREAMS;
    memset(out, 0, (size_t)M * N * sizeof(float));
    for (int i = 0; i < run; i++) {
        const float *row[STREAMS];
        for (int s = 0; s < STREAMS; s++)
            row[s] = w + (int64_t)(s * run + i) * N;
        for (int c = 0; c < N; c += COLUMNS) {
            const int end = c + COLUMNS < N ? c + COLUMNS : N;
            for (int m = 0; m < M; m++) {
                float a[STREAMS];
                for (int s = 0; s < STREAMS; s++)
                    a[s] = x[m * x_stride + s * run + i];
                float *restrict o = out + (int64_t)m * N;
                for (int j = c; j < end; j++) {
                    float sum = o[j];
                    for (int s = 0; s < STREAMS; s++)
                        sum += a[s] * row[s][j];
                    o[j] = sum;
                }
            }
        }
    }
    for (int i = STREAMS * run; i < K; i++) {  /* the K % STREAMS rows left, one at a time */
        const float *restrict row = w + (int64_t)i * N;
        for (int m = 0; m < M; m++) {
            const float a = x[m * x_stride + i];
            float *restrict o = out + (int64_t)m * N;
            for (int j = 0; j < N; j++)
                o[j] += a * row[j];
        }
    }
}

/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * weight, x and out [M, D]. torch's RMS norm is five
 * operations of its own and a product by the weight, each the cost of a dispatch to code the
 * weights streamed through the caches have evicted: 43 us a norm on the 2-core EPYC, 2.6 ms of a
 * SmolLM2-135M decode step (61 norms); one call here took the step 36.0 -> 34.1 ms (CPU time,
 * one thread, load 3.3). */
void rms_norm_rows(int M, int D, const float *restrict x, const float *restrict weight, float eps,
                   float *restrict out) {
    for (int m = 0; m < M; m++) {
        const float *restrict row = x + (int64_t)m * D;
        float squares = 0;
        for (int i = 0; i < D; i++)
            squares += row[i] * row[i];
        const float scale = 1.0f / sqrtf(squares / D + eps);
        for (int i = 0; i < D; i++)
            out[(int64_t)m * D + i] = row[i] * scale * weight[i];
    }
}
