/* Decode attention over one segment of a cache (packed history, or fp32 rows), on the CPU:
 * kernels/streaming.py compiles this file with the system's C compiler (x86-64: SSE control
 * register for subnormals) and calls it through ctypes where it applies (token stores with one
 * channel group per head; keys of 1, 2, 3, 4 or 8 bits or ternary, values of whole bytes: 1, 2,
 * 4, 8 bits or ternary; post-RoPE keys; a few query rows), and streams in plain torch elsewhere
 * (or where it does not compile).
 *
 * Nothing is unpacked to memory. A row of packed codes is a run of bytes (quant/packing.py): for
 * a power-of-two radix a little-endian bit stream, bit g of the row being bit g % bits of the
 * code of channel g / bits (a 3-bit code may straddle two bytes); for ternary, 5 base-3 digits a
 * byte. A key's dot product with the head's queries q (times the keys' smoothing) is linear in
 * its codes, so it is a sum of one table entry per byte, be the byte's codes whole or in part:
 *     q . codes(t) = sum_j key_table[j][byte_tj][m],
 *     key_table[j][v][m] = sum_i bit_i(v) 2^((8j+i) % bits) q[m][(8j+i) / bits]
 *     (ternary: key_table[j][v][m] = sum_i digit_i(v) q[m][5j+i])
 * With AVX-512 and keys of a power-of-two radix the same sum runs per nibble, 16 tokens at a
 * time, the 16-entry tables held in vector registers (score_by_nibbles); elsewhere one scalar
 * table read per byte. Values are read where each byte holds `per_byte` whole codes (1, 2, 4, 8
 * bits, ternary): their weighted sum is accumulated per byte as a vector of its digits (read from a
 * table of 8 fp32 lanes per byte value) times the token's weight, one multiply-add per value byte
 * and query row (sum_values):
 *     value_sum[m][j][i] = sum_t w_t digit_i(byte_tj) = sum_t w_t codes(t)[j*per_byte+i]
 * An fp32 online softmax runs over blocks of BLOCK tokens; the sums are rescaled when a block raises
 * the running maximum. The softmax state per (sequence, KV head, row), max m, mass l and
 * unnormalized output acc, comes in holding the segments read before and goes out including this
 * one (one online softmax across segments, no merge in torch). Measured on a 2-core AMD EPYC
 * (one thread, 2-bit keys, ternary values, 2 query rows): 36 ns per token and KV head with
 * scalar tables and a value histogram; 13-14 ns with the nibble tables and digit vectors (keys
 * about 4, values about 8, softmax and metadata about 2). 3-bit keys cost 1.5x the nibbles of
 * 2-bit ones: at 32K tokens, 3 heads, 3 rows and load 3.9, 1.81 ms against 1.71 (the torch path
 * took 57); 8-bit keys, by nibbles rather than byte tables, 2.9 ms (was 10).
 *
 * attend_full does the same over full-precision fp32 rows (the unquantized cache, the sinks and
 * the ring window): for M = G query rows, BLAS runs q @ K^T as a thin matrix product well below
 * the memory's speed; a dot product per row and key, in vector registers, does not.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 512  /* tokens per online-softmax step: their scores stay in L1 */
#define VALUE_BYTES 8  /* value bytes summed per pass over a block: 8 x M sums in registers */

/* HEAD(rows) with rows a constant where M is a common count, so that the loops over rows unroll. */
#define FOR_ROWS(M, HEAD) switch (M) { \
    case 1: HEAD(1); break; case 2: HEAD(2); break; case 3: HEAD(3); break; case 4: HEAD(4); break; \
    case 8: HEAD(8); break; \
    default: HEAD(M); }

/* Weights far below the maximum are subnormal, and x86 adds those a hundred times slower: flush
 * them to zero (and treat them as zero) around `work` only, as the thread is torch's afterwards. */
#define FLUSHING_SUBNORMALS(work) do { \
    unsigned int csr = _mm_getcsr(); \
    _mm_setcsr(csr | 0x8040); \
    work; \
    _mm_setcsr(csr); } while (0)

typedef float lanes8 __attribute__((vector_size(32), aligned(4)));  /* 8 floats, one AVX register */

/* max(x[0..len-1]); a vector of running maxima where AVX has one (a single running maximum is a
 * chain the compiler will not vectorize without -ffinite-math-only) */
static inline float max_of(const float *x, int len) {
    float m = -INFINITY;
    int t = 0;
#ifdef __AVX__
    __m256 lane_max = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= len; t += 8) lane_max = _mm256_max_ps(lane_max, _mm256_loadu_ps(x + t));
    float lanes[8];
    _mm256_storeu_ps(lanes, lane_max);
    for (int i = 0; i < 8; i++) m = fmaxf(m, lanes[i]);
#endif
    for (; t < len; t++) m = fmaxf(m, x[t]);
    return m;
}

/* Metadata dtypes: 0 fp16, 1 fp8 e4m3fn. */
static float fp8_e4m3[256];

static void init_fp8(void) {
    for (int v = 0; v < 256; v++) {
        int sign = v >> 7, exponent = (v >> 3) & 15, mantissa = v & 7;
        float x = exponent ? ldexpf(1.0f + mantissa / 8.0f, exponent - 7) : ldexpf(mantissa / 8.0f, -6);
        if (exponent == 15 && mantissa == 7) x = NAN;
        fp8_e4m3[v] = sign ? -x : x;
    }
}

/* e^x for x <= 0 (clamped at -87, where it is below 2^-125), relative error about 1e-7: 2^(x log2 e)
 * split into an integer power, set in the exponent bits, and a degree-6 polynomial for the
 * fraction. Unlike expf, the compiler vectorizes it. */
static inline float exp_nonpositive(float x) {
    float t = (x < -87.0f ? -87.0f : x) * 1.4426950409f;
    float n = floorf(t), f = t - n;
    float p = 1.535336188e-4f;
    p = p * f + 1.339887440e-3f;
    p = p * f + 9.618437357e-3f;
    p = p * f + 5.550332471e-2f;
    p = p * f + 2.402264791e-1f;
    p = p * f + 6.931472028e-1f;
    p = p * f + 1.0f;
    union { int32_t i; float f; } power = { .i = ((int32_t)n + 127) << 23 };
    return p * power.f;
}

/* out[t] = the metadata at p[first + t * stride] as fp32, t < len (contiguous fp16: vectorized) */
static void read_meta(const void *p, int64_t first, int64_t stride, int kind, int len, float *out) {
    const _Float16 *half = (const _Float16 *)p + first;
    const uint8_t *fp8 = (const uint8_t *)p + first;
    int t = 0;
#ifdef __F16C__
    if (kind == 0 && stride == 1)  /* the compiler does not vectorize the conversion itself */
        for (; t + 8 <= len; t += 8) _mm256_storeu_ps(out + t, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(half + t))));
#endif
    if (kind == 0 && stride == 1)
        for (; t < len; t++) out[t] = (float)half[t];
    else if (kind == 0)
        for (; t < len; t++) out[t] = (float)half[t * stride];
    else
        for (; t < len; t++) out[t] = fp8_e4m3[fp8[t * stride]];
}

/* digits[radix][v][i]: digit i of byte v in base radix (radix ** per_byte <= 256) */
static float digits[257][256][8];

static void init_digits(void) {
    int radices[] = {2, 3, 4, 16, 256};
    for (int n = 0; n < 5; n++)
        for (int v = 0; v < 256; v++)
            for (int i = 0, x = v; i < 8; i++, x /= radices[n])
                digits[radices[n]][v][i] = x % radices[n];
}

typedef struct {
    const uint8_t *codes;                    /* [B, Hkv, T, row_bytes] at strides (sb, sh, st) */
    int64_t sb, sh, st;
    const void *scale, *low;                 /* [B, Hkv, T, 1] at strides (mb, mh, mt) */
    int64_t mb, mh, mt;
    int row_bytes, radix;
    int per_byte;                            /* whole codes a byte holds; 3 bits: 0, they straddle bytes */
    int meta_kind;
} Operand;

/* Bits a code takes in the row's bit stream for a power-of-two radix (1, 2, 3, 4, 8); 0 for
 * ternary, whose bytes are base-3 digits. */
static inline int code_bits(int radix) {
    return radix & (radix - 1) ? 0 : __builtin_ctz(radix);
}

/* A row's codes of `bits` bits each, in bits first .. first + width - 1 of its bit stream, read
 * as x: their share of the row's dot product with qr [D]. Bit g weighs 2^(g % bits) in channel
 * g / bits, so a code split across two parts (3 bits) gets its share from each; bits past the last
 * channel are padding. */
static float stream_dot(const float *qr, int D, int bits, int first, int width, int x) {
    float sum = 0.0f;
    for (int i = 0; i < width; i++) {
        int g = first + i;
        if ((x >> i & 1) && g / bits < D) sum += qr[g / bits] * (float)(1 << g % bits);
    }
    return sum;
}

#ifdef __AVX512F__
/* Dwords w0 .. w0 + count - 1 (count <= 8) of 16 rows at `rows` (stride st; rows from `live` on
 * read as zeros) as out[w - w0] [16 lanes, one per row]: the rows in ymm halves (row i low, row
 * i + 8 high), then the 8 x 8 transpose of AVX in both halves at once (interleave dwords, then
 * qwords, then 128-bit lanes). Masked loads read nothing past a row's `count` dwords. */
static inline __attribute__((always_inline)) void transpose_rows(
        const uint8_t *rows, int64_t st, int live, int w0, int count, __m512i out[8]) {
    __mmask8 dwords = (__mmask8)((1u << count) - 1);
    __m512i a[8], b[8];
    for (int i = 0; i < 8; i++) {
        __m256i low = _mm256_maskz_loadu_epi32(i < live ? dwords : 0, rows + i * st + 4 * w0);
        __m256i high = _mm256_maskz_loadu_epi32(i + 8 < live ? dwords : 0, rows + (i + 8) * st + 4 * w0);
        a[i] = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
    }
    for (int i = 0; i < 8; i += 2) {
        b[i] = _mm512_unpacklo_epi32(a[i], a[i + 1]);
        b[i + 1] = _mm512_unpackhi_epi32(a[i], a[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        a[i] = _mm512_unpacklo_epi64(b[i], b[i + 2]);
        a[i + 1] = _mm512_unpackhi_epi64(b[i], b[i + 2]);
        a[i + 2] = _mm512_unpacklo_epi64(b[i + 1], b[i + 3]);
        a[i + 3] = _mm512_unpackhi_epi64(b[i + 1], b[i + 3]);
    }
    const __m512i first_lanes = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    const __m512i second_lanes = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for (int i = 0; i < 4; i++) {
        out[i] = _mm512_permutex2var_epi64(a[i], first_lanes, a[i + 4]);
        out[i + 4] = _mm512_permutex2var_epi64(a[i], second_lanes, a[i + 4]);
    }
}

/* Keys of a power-of-two radix score as a sum over the nibbles of their rows (stream_dot): a
 * 16-entry table per nibble position p and query row r, nibble_table[p][r][v] = the share of the
 * codes in bits 4p .. 4p + 3 when they read v, fills one zmm register, and vpermps looks up 16
 * tokens at once (one token per lane, its nibble as the lane's index: vpermps reads only an
 * index's low 4 bits, so a shift alone selects the nibble). A transpose brings dword w of 16
 * tokens' rows (8 nibbles each) into one register (a gather did the same at twice the cost). Two
 * sums per row (even, odd nibbles) halve the chain of dependent adds. Writes scores [M, BLOCK]
 * for tokens 0..len-1 of rows at `codes` (stride st). */
static inline __attribute__((always_inline)) void score_by_nibbles(
        const uint8_t *codes, int64_t st, int len, int dwords, const int M, const float *nibble_table,
        float *scores) {
    for (int t = 0; t < len; t += 16) {
        int live = len - t < 16 ? len - t : 16;
        for (int64_t byte = 0; byte < 16 * st; byte += 64) __builtin_prefetch(codes + (t + BLOCK) * st + byte);
        __m512 even[M], odd[M];
        for (int r = 0; r < M; r++) even[r] = odd[r] = _mm512_setzero_ps();
        for (int w0 = 0; w0 < dwords; w0 += 8) {
            int count = dwords - w0 < 8 ? dwords - w0 : 8;
            __m512i transposed[8];
            transpose_rows(codes + t * st, st, live, w0, count, transposed);
            for (int w = 0; w < count; w++) {
                const float *table = nibble_table + (int64_t)(w0 + w) * 8 * M * 16;
                for (int n = 0; n < 8; n += 2) {
                    __m512i low = _mm512_srli_epi32(transposed[w], 4 * n);
                    __m512i high = _mm512_srli_epi32(transposed[w], 4 * n + 4);
                    for (int r = 0; r < M; r++) {
                        even[r] = _mm512_add_ps(even[r], _mm512_permutexvar_ps(low, _mm512_load_ps(table + (n * M + r) * 16)));
                        odd[r] = _mm512_add_ps(odd[r], _mm512_permutexvar_ps(high, _mm512_load_ps(table + ((n + 1) * M + r) * 16)));
                    }
                }
            }
        }
        __mmask16 stored = (__mmask16)((1u << live) - 1);
        for (int r = 0; r < M; r++) _mm512_mask_storeu_ps(scores + r * BLOCK + t, stored, _mm512_add_ps(even[r], odd[r]));
    }
}

/* nibble_table [2 * row_bytes, M, 16] (64-byte aligned) for the head's queries qh [M, D]; NULL
 * for ternary keys (a nibble is no part of a base-3 byte) or rows not whole dwords. */
static float *nibble_tables(const float *qh, const int M, int D, Operand k) {
    int bits = code_bits(k.radix), nibbles = 2 * k.row_bytes;
    if (!bits || k.row_bytes % 4) return NULL;
    float *table = aligned_alloc(64, sizeof(float) * nibbles * M * 16);
    for (int p = 0; p < nibbles; p++)
        for (int r = 0; r < M; r++)
            for (int v = 0; v < 16; v++)
                table[(p * M + r) * 16 + v] = stream_dot(qh + r * D, D, bits, 4 * p, 4, v);
    return table;
}
#endif

/* The values' weighted sum, bytes j .. j + width - 1 of the rows at `codes` (stride st), tokens
 * 0..len-1 weighted by w [M, BLOCK]: value_sum[r][j] (a row of `stride` lanes8) gains
 * sum_t w[r][t] digits(byte_tj), the byte's digits as 8 fp32 lanes read from a table, one fused
 * multiply-add per byte and row. With width a constant (VALUE_BYTES) the M x width sums stay in
 * registers over the block. */
static inline __attribute__((always_inline)) void sum_values(
        const uint8_t *codes, int64_t st, int len, const int width, const int M, int radix, const float *w,
        lanes8 *value_sum, int stride) {
    lanes8 sums[M][width];
    for (int r = 0; r < M; r++)
        for (int j = 0; j < width; j++) sums[r][j] = value_sum[r * stride + j];
    const lanes8 *table = (const lanes8 *)digits[radix];
    for (int t = 0; t < len; t++) {
        const uint8_t *row = codes + t * st;
        for (int j = 0; j < width; j++) {
            lanes8 d = table[row[j]];
            for (int r = 0; r < M; r++) sums[r][j] += w[r * BLOCK + t] * d;
        }
    }
    for (int r = 0; r < M; r++)
        for (int j = 0; j < width; j++) value_sum[r * stride + j] = sums[r][j];
}

/* One (sequence b, KV head h). M, the query rows, is a constant where the caller inlines it,
 * so that the per-byte loops over rows unroll. */
static inline __attribute__((always_inline)) void attend_head(
        int b, int h, int Hkv, const int M, int D, const float *q, const int64_t *count,
        const Operand k, const Operand v, const float *k_rotation, const float *v_smoothing,
        const float *v_rotation, float *m_out, float *l_out, float *acc_out) {
    const float *qh = q + ((int64_t)b * Hkv + h) * M * D;
    float rotated_q[k_rotation ? M * D : 1];
    if (k_rotation) {  /* keys stored rotated: q . k = (q R) . (k R), q R once per head here, along R's rows */
        memset(rotated_q, 0, sizeof(float) * M * D);
        for (int r = 0; r < M; r++)
            for (int d = 0; d < D; d++)
                for (int j = 0; j < D; j++) rotated_q[r * D + j] += qh[r * D + d] * k_rotation[d * D + j];
        qh = rotated_q;
    }
    float *key_table = NULL;  /* [row_bytes, 256, M] where there is no nibble table */
    lanes8 *value_sum = calloc((size_t)M * v.row_bytes, sizeof(lanes8));  /* [M, row_bytes]: lane i, digit i */
    float *scores = malloc(sizeof(float) * BLOCK * M);  /* [M, BLOCK]: a row's scores in a run */
    float *q_sum = calloc(M, sizeof(float)), *low_sum = calloc(M, sizeof(float));
    int64_t at = ((int64_t)b * Hkv + h) * M;
    /* the softmax so far (other segments'), carried: its output is rescaled as l is */
    float m_run[M], l_run[M], carried[M];
    for (int r = 0; r < M; r++) { m_run[r] = m_out[at + r]; l_run[r] = l_out[at + r]; carried[r] = 1.0f; }
#ifdef __AVX512F__
    float *nibble_table = nibble_tables(qh, M, D, k);
    if (!nibble_table)
#endif
    key_table = calloc((size_t)k.row_bytes * 256 * M, sizeof(float));
    for (int j = 0, bits = code_bits(k.radix); key_table && j < k.row_bytes; j++)
        for (int x = 0; x < 256; x++)
            for (int r = 0; r < M; r++) {
                float *entry = key_table + ((int64_t)j * 256 + x) * M + r;
                if (bits)
                    *entry = stream_dot(qh + r * D, D, bits, 8 * j, 8, x);
                else  /* ternary: the byte's base-3 digits */
                    for (int i = 0; i < k.per_byte && j * k.per_byte + i < D; i++)
                        *entry += qh[r * D + j * k.per_byte + i] * digits[k.radix][x][i];
            }
    for (int r = 0; r < M; r++)
        for (int d = 0; d < D; d++) q_sum[r] += qh[r * D + d];
    const uint8_t *kc = k.codes + b * k.sb + h * k.sh, *vc = v.codes + b * v.sb + h * v.sh;
    int64_t km = b * k.mb + h * k.mh, vm = b * v.mb + h * v.mh, n = count[b];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
#ifdef __AVX512F__
        if (nibble_table) score_by_nibbles(kc + start * k.st, k.st, len, k.row_bytes / 4, M, nibble_table, scores);
        else
#endif
        for (int t = 0; t < len; t++) {
            const uint8_t *row = kc + (start + t) * k.st;
            float s[M];  /* in registers, as w below */
            for (int r = 0; r < M; r++) s[r] = 0.0f;
            for (int j = 0; j < k.row_bytes; j++) {
                const float *entry = key_table + ((int64_t)j * 256 + row[j]) * M;
                for (int r = 0; r < M; r++) s[r] += entry[r];
            }
            for (int r = 0; r < M; r++) scores[r * BLOCK + t] = s[r];
        }
        float scale[BLOCK], low[BLOCK];
        read_meta(k.scale, km + start * k.mt, k.mt, k.meta_kind, len, scale);
        read_meta(k.low, km + start * k.mt, k.mt, k.meta_kind, len, low);
        for (int r = 0; r < M; r++)
            for (int t = 0; t < len; t++) scores[r * BLOCK + t] = scores[r * BLOCK + t] * scale[t] + low[t] * q_sum[r];
        for (int r = 0; r < M; r++) {
            float block_max = max_of(scores + r * BLOCK, len);
            if (block_max > m_run[r]) {  /* rescale what was accumulated under the old maximum */
                float factor = exp_nonpositive(m_run[r] - block_max);
                for (int j = 0; j < v.row_bytes; j++) value_sum[r * v.row_bytes + j] *= factor;
                l_run[r] *= factor;
                carried[r] *= factor;
                low_sum[r] *= factor;
                m_run[r] = block_max;
            }
            float mass = 0.0f;
            for (int t = 0; t < len; t++) {
                float p = exp_nonpositive(scores[r * BLOCK + t] - m_run[r]);
                scores[r * BLOCK + t] = p;
                mass += p;
            }
            l_run[r] += mass;
        }
        read_meta(v.scale, vm + start * v.mt, v.mt, v.meta_kind, len, scale);
        read_meta(v.low, vm + start * v.mt, v.mt, v.meta_kind, len, low);
        for (int r = 0; r < M; r++) {
            float low_mass = 0.0f;
            for (int t = 0; t < len; t++) {
                low_mass += scores[r * BLOCK + t] * low[t];
                scores[r * BLOCK + t] *= scale[t];
            }
            low_sum[r] += low_mass;
        }
        const uint8_t *rows = vc + start * v.st;
        int j = 0;
        for (; j + VALUE_BYTES <= v.row_bytes; j += VALUE_BYTES)
            sum_values(rows + j, v.st, len, VALUE_BYTES, M, v.radix, scores, value_sum + j, v.row_bytes);
        if (j < v.row_bytes)
            sum_values(rows + j, v.st, len, v.row_bytes - j, M, v.radix, scores, value_sum + j, v.row_bytes);
    }
    for (int r = 0; r < M; r++) {
        float *acc = acc_out + (at + r) * D, fresh[D];
        for (int d = 0; d < D; d++) fresh[d] = low_sum[r];
        for (int j = 0; j < v.row_bytes; j++)
            for (int i = 0; i < v.per_byte && j * v.per_byte + i < D; i++)
                fresh[j * v.per_byte + i] += value_sum[r * v.row_bytes + j][i];
        if (v_rotation) {  /* values stored rotated: fresh times R^T, back in the model's channels */
            float stored[D];
            memcpy(stored, fresh, sizeof(float) * D);
            for (int e = 0; e < D; e++) {  /* a dot product along R's row e */
                float sum = 0.0f;
                for (int d = 0; d < D; d++) sum += stored[d] * v_rotation[e * D + d];
                fresh[e] = sum;
            }
        }
        for (int d = 0; d < D; d++) acc[d] = acc[d] * carried[r] + fresh[d] * v_smoothing[h * D + d];
        m_out[at + r] = m_run[r];
        l_out[at + r] = l_run[r];
    }
#ifdef __AVX512F__
    free(nibble_table);
#endif
    free(key_table); free(value_sum); free(scores); free(q_sum); free(low_sum);
}

/* For every (b, h): q [B, Hkv, M, D] fp32 contiguous, already scaled by 1/sqrt(D) and the keys'
 * smoothing; k_rotation [D, D] or NULL, the keys' rotation R (q is rotated here); count [B]
 * tokens; v_smoothing [Hkv, D]; v_rotation [D, D] or NULL, the values' rotation. m_out, l_out [B, Hkv, M] and acc_out [B, Hkv, M, D] hold
 * the softmax state of the segments before (m = -inf, l = acc = 0: none) and are updated in place
 * to include this one (acc in the model's channels: times R^T, then the values' smoothing). */
void attend_packed(int B, int Hkv, int M, int D, const float *q, const int64_t *count,
                   Operand k, Operand v, const float *k_rotation, const float *v_smoothing, const float *v_rotation,
                   float *m_out, float *l_out, float *acc_out, int threads) {
    static int ready = 0;
    if (!ready) { init_fp8(); init_digits(); ready = 1; }
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(dynamic, 1)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < Hkv; h++) {
            #define HEAD(rows) attend_head(b, h, Hkv, rows, D, q, count, k, v, k_rotation, v_smoothing, v_rotation, \
                                           m_out, l_out, acc_out)
            FLUSHING_SUBNORMALS(FOR_ROWS(M, HEAD));
            #undef HEAD
        }
    }
}

/* One (b, h) of attend_full: keys, values [.., T, D] fp32 rows at strides; token i in slot
 * (first + i) % ring. */
static inline __attribute__((always_inline)) void attend_full_head(
        int b, int h, int Hkv, const int M, int D, const float *q, int64_t n, int64_t first, int64_t ring,
        const float *keys, const float *values, int64_t st, float *m_out, float *l_out, float *acc_out) {
    const float *qh = q + ((int64_t)b * Hkv + h) * M * D;
    int64_t at = ((int64_t)b * Hkv + h) * M;
    float *acc = acc_out + at * D, scores[BLOCK * M], m_run[M], l_run[M];
    for (int r = 0; r < M; r++) { m_run[r] = m_out[at + r]; l_run[r] = l_out[at + r]; }  /* the state so far */
    for (int64_t start = 0; start < n; start += BLOCK) {
        int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        for (int t = 0; t < len; t++) {
            const lanes8 *key = (const lanes8 *)(keys + ((first + start + t) % ring) * st);
            for (int r = 0; r < M; r++) {
                const lanes8 *query = (const lanes8 *)(qh + r * D);
                lanes8 sum = {0};
                for (int d = 0; d < D / 8; d++) sum += query[d] * key[d];
                scores[r * BLOCK + t] = sum[0] + sum[1] + sum[2] + sum[3] + sum[4] + sum[5] + sum[6] + sum[7];
            }
        }
        for (int r = 0; r < M; r++) {
            float block_max = max_of(scores + r * BLOCK, len);
            if (block_max > m_run[r]) {
                float factor = exp_nonpositive(m_run[r] - block_max);
                for (int d = 0; d < D; d++) acc[r * D + d] *= factor;
                l_run[r] *= factor;
                m_run[r] = block_max;
            }
            for (int t = 0; t < len; t++) {
                float p = exp_nonpositive(scores[r * BLOCK + t] - m_run[r]);
                scores[r * BLOCK + t] = p;
                l_run[r] += p;
            }
        }
        for (int t = 0; t < len; t++) {
            const lanes8 *value = (const lanes8 *)(values + ((first + start + t) % ring) * st);
            for (int r = 0; r < M; r++) {
                lanes8 *out = (lanes8 *)(acc + r * D);
                float p = scores[r * BLOCK + t];
                for (int d = 0; d < D / 8; d++) out[d] += p * value[d];
            }
        }
    }
    for (int r = 0; r < M; r++) { m_out[at + r] = m_run[r]; l_out[at + r] = l_run[r]; }
}

/* As attend_packed over full-precision rows: keys, values [B, Hkv, T, D] fp32 at strides (sb, sh,
 * st), D a multiple of 8; sequence b's token i in slot (first_slot[b] + i) % T (first_slot NULL:
 * slot i); q is not smoothed. */
void attend_full(int B, int Hkv, int M, int D, const float *q, const int64_t *count, const int64_t *first_slot,
                 int64_t T, const float *keys, const float *values, int64_t sb, int64_t sh, int64_t st,
                 float *m_out, float *l_out, float *acc_out, int threads) {
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(dynamic, 1)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < Hkv; h++) {
            int64_t first = first_slot ? first_slot[b] : 0, offset = b * sb + h * sh;
            #define HEAD(rows) attend_full_head(b, h, Hkv, rows, D, q, count[b], first, T, keys + offset, \
                                                values + offset, st, m_out, l_out, acc_out)
            FLUSHING_SUBNORMALS(FOR_ROWS(M, HEAD));
            #undef HEAD
        }
    }
}

/* fp32 -> fp8 e4m3fn bits, rounded to nearest, ties to even, as torch converts (c10's
 * fp8e4m3fn_from_fp32_value, saturating: what would round past 448, the largest finite value, is 448). */
static uint8_t to_fp8_e4m3(float x) {
    union { float f; uint32_t u; } bits = { .f = x };
    uint32_t sign = bits.u & 0x80000000u, magnitude = bits.u ^ sign;
    uint8_t out;
    if (magnitude >= 1087u << 20) {
        out = 0x7e;
    } else if (magnitude < 121u << 23) {  /* subnormal: an add at 2^-9's scale rounds it */
        union { float f; uint32_t u; } denormal = { .u = 141u << 23 }, sum = { .u = magnitude };
        sum.f += denormal.f;
        out = (uint8_t)(sum.u - denormal.u);
    } else {
        magnitude += ((uint32_t)(7 - 127) << 23) + 0x7FFFF + ((magnitude >> 20) & 1);
        out = (uint8_t)(magnitude >> 20);
        out = out == 0x7f ? 0x7e : out;  /* rounded up past 448 */
    }
    return out | (uint8_t)(sign >> 24);
}

/* A metadata value rounded as stored (kind 0: fp16, 1: fp8 e4m3fn), written at p[i]; returns it as fp32. */
static float store_meta(void *p, int64_t i, int kind, float x) {
    if (kind == 0) {
        _Float16 half = (_Float16)x;
        ((_Float16 *)p)[i] = half;
        return (float)half;
    }
    uint8_t fp8 = to_fp8_e4m3(x);
    ((uint8_t *)p)[i] = fp8;
    return fp8_e4m3[fp8];
}

/* How one side's tokens are quantized (quant/skvq.py TokenQuantizer): the static divisors
 * smoothing [Hkv, D]; rotation [D, D] (fp32) or NULL; for scaling=minmax the clip factor, for
 * scaling=rms (n_steps > 0) the steps, in units of the group's RMS, to try (quant/uniform.py rms_steps). */
typedef struct {
    const float *smoothing, *rotation, *rms_steps;
    float clip;
    int n_steps;
} Quantizer;

/* One token's D channels x (fp32) into row `row` of a store of one channel group per head:
 * quant/skvq.py TokenQuantizer.quantize and quant/uniform.py quantize_groups, operation for
 * operation. y = x / smoothing, times R in fp64 (the fp32 products are exact, so the sum almost
 * always is, whatever its order). min-max: low = clip * min, scale = clip * (max - min) / (levels - 1);
 * rms: for each step, scale = step * RMS(y), low = -(levels - 1) / 2 * scale, kept where the fp64
 * squared error against the stored pair is strictly the least so far. Both floored, rounded to the
 * stored dtype; codes floor((y - low) / scale + 1/2) against those, clamped; packed as
 * quant/packing.py packs. */
static void quantize_token(const float *x, int D, Operand s, int64_t b, int64_t h, int64_t row, Quantizer q) {
    float y[D], hi = -INFINITY, lo = INFINITY;
    for (int d = 0; d < D; d++)
        y[d] = x[d] / q.smoothing[h * D + d];
    if (q.rotation) {  /* row by row of R, so that the sums over d run along R's rows in vectors */
        double sum[D];
        for (int j = 0; j < D; j++) sum[j] = 0.0;
        for (int d = 0; d < D; d++)
            for (int j = 0; j < D; j++)
                sum[j] += (double)y[d] * (double)q.rotation[d * D + j];
        for (int j = 0; j < D; j++) y[j] = (float)sum[j];
    }
    const int top = s.radix - 1;
    const float floor_ = s.meta_kind ? 0x1p-9f : 1e-6f;
    int64_t m = b * s.mb + h * s.mh + row * s.mt;
    float scale, low;
    if (q.n_steps == 0) {
        for (int d = 0; d < D; d++) {
            hi = y[d] > hi ? y[d] : hi;
            lo = y[d] < lo ? y[d] : lo;
        }
        float step = q.clip * (hi - lo) / (float)top;
        scale = store_meta((void *)s.scale, m, s.meta_kind, step > floor_ ? step : floor_);
        low = store_meta((void *)s.low, m, s.meta_kind, q.clip * lo);
    } else {
        double squares = 0.0, least = INFINITY;
        for (int d = 0; d < D; d++)
            squares += (double)y[d] * (double)y[d];
        float rms = sqrtf((float)(squares / D)), best = 0.0f;
        for (int i = 0; i < q.n_steps; i++) {
            float step = q.rms_steps[i] * rms;
            step = step > floor_ ? step : floor_;
            uint8_t scratch[4];  /* the pair rounded as stored, to score it */
            float scale_i = store_meta(scratch, 0, s.meta_kind, step);
            float low_i = store_meta(scratch, 1, s.meta_kind, -0.5f * (float)top * step);
            double error = 0.0;
            for (int d = 0; d < D; d++) {
                float c = floorf((y[d] - low_i) / scale_i + 0.5f);
                c = c < 0.0f ? 0.0f : c > top ? (float)top : c;
                double e = (double)c * scale_i + low_i - y[d];
                error += e * e;
            }
            if (error < least)  /* strict: a tie keeps the earlier step */
                least = error, best = step;
        }
        scale = store_meta((void *)s.scale, m, s.meta_kind, best);
        low = store_meta((void *)s.low, m, s.meta_kind, -0.5f * (float)top * best);
    }
    int code[D], bits = code_bits(s.radix);
    for (int d = 0; d < D; d++) {
        float c = floorf((y[d] - low) / scale + 0.5f);
        code[d] = c < 0.0f ? 0 : c > top ? top : (int)c;
    }
    uint8_t *codes = (uint8_t *)s.codes + b * s.sb + h * s.sh + row * s.st;
    for (int j = 0; j < s.row_bytes; j++) {
        int byte = 0;
        if (bits)  /* bit i of byte j: bit g % bits of channel g / bits, g = 8j + i (past D: 0) */
            for (int i = 0, g = 8 * j; i < 8; i++, g++)
                byte |= g / bits < D ? (code[g / bits] >> g % bits & 1) << i : 0;
        else  /* ternary: base-3 digits, the earliest channel least significant */
            for (int i = s.per_byte - 1; i >= 0; i--)
                byte = byte * s.radix + (j * s.per_byte + i < D ? code[j * s.per_byte + i] : 0);
        codes[j] = (uint8_t)byte;
    }
}

/* A decode step's write of one layer, as kernels/quantize.py write_decode_token does it on a GPU:
 * for every (b, h), where evict_row[b] >= 0, first the token at that history row, recent until
 * now in ring slot evict_row[b] % ring, quantized into the key and value stores (store row
 * evict_row[b] - first_row); then the new token k, v [B, Hkv, D] (strides kb, kh) at position[b]
 * into sink slot position[b] (< S) or ring slot (position[b] - S) % ring. Sinks [B, Hkv, S, D] at
 * strides sink_strides, window [B, Hkv, ring, D] at window_strides (batch, head, token), fp32. */
void write_token(int B, int Hkv, int D, const float *k, const float *v, int64_t kb, int64_t kh,
                 const int64_t *position, float *sink_k, float *sink_v, int S, const int64_t *sink_strides,
                 float *window_k, float *window_v, int64_t ring, const int64_t *window_strides,
                 const int64_t *evict_row, int64_t first_row, Operand keys, Operand values,
                 Quantizer k_quantizer, Quantizer v_quantizer) {
    static int ready = 0;
    if (!ready) { init_fp8(); init_digits(); ready = 1; }
    const int64_t *ss = sink_strides, *ws = window_strides;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < Hkv; h++) {
            int64_t p = position[b], row = evict_row[b], ring_head = b * ws[0] + h * ws[1];
            if (row >= 0) {
                int64_t at = ring_head + row % ring * ws[2];
                quantize_token(window_k + at, D, keys, b, h, row - first_row, k_quantizer);
                quantize_token(window_v + at, D, values, b, h, row - first_row, v_quantizer);
            }
            int64_t slot = p < S ? b * ss[0] + h * ss[1] + p * ss[2] : ring_head + (p - S) % ring * ws[2];
            memcpy((p < S ? sink_k : window_k) + slot, k + b * kb + h * kh, sizeof(float) * D);
            memcpy((p < S ? sink_v : window_v) + slot, v + b * kb + h * kh, sizeof(float) * D);
        }
}
