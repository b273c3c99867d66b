/* Keyed BLAKE2b-256 (RFC 7693) and CRC-32 (IEEE, zlib's) for the key check.
 *
 * BLAKE2b is the keyed digest that the key table stores (DESIGN: "keyed
 * BLAKE2b with a server secret"); it must equal
 * hashlib.blake2b(msg, key=secret, digest_size=32).digest(), which the tests
 * check.  It lives here because OpenSSL HMAC through Python costs ~1.4 us.
 * Keyed BLAKE2b compresses the zero-padded secret as block 0, so the state
 * after that block is computed once per secret (fg_b2_init_keyed) and each
 * key costs one compression when it is at most 128 bytes.
 */
#ifndef FASTGATE_HASH_H
#define FASTGATE_HASH_H

#include <stdint.h>
#include <string.h>

typedef struct { uint64_t h[8]; } fg_b2_state;

static const uint64_t fg_b2_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

static const uint8_t fg_b2_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

static inline uint64_t fg_rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t fg_le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

#define FG_B2_G(a, b, c, d, x, y)              \
    do {                                       \
        v[a] = v[a] + v[b] + (x);              \
        v[d] = fg_rotr64(v[d] ^ v[a], 32);     \
        v[c] = v[c] + v[d];                    \
        v[b] = fg_rotr64(v[b] ^ v[c], 24);     \
        v[a] = v[a] + v[b] + (y);              \
        v[d] = fg_rotr64(v[d] ^ v[a], 16);     \
        v[c] = v[c] + v[d];                    \
        v[b] = fg_rotr64(v[b] ^ v[c], 63);     \
    } while (0)

static inline void fg_b2_compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t v[16], m[16];
    int i;
    for (i = 0; i < 16; i++) m[i] = fg_le64(block + 8 * i);
    for (i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = fg_b2_iv[i]; }
    v[12] ^= t; /* keys and messages here are far below 2**64 bytes: t's high word stays 0 */
    if (last) v[14] = ~v[14];
    for (i = 0; i < 12; i++) {
        const uint8_t *s = fg_b2_sigma[i];
        FG_B2_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        FG_B2_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        FG_B2_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        FG_B2_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        FG_B2_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        FG_B2_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        FG_B2_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        FG_B2_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* State after the key block of a keyed BLAKE2b-256; keylen 1..64. */
static inline void fg_b2_init_keyed(fg_b2_state *st, const uint8_t *key, size_t keylen) {
    uint8_t block[128];
    int i;
    for (i = 0; i < 8; i++) st->h[i] = fg_b2_iv[i];
    st->h[0] ^= 0x01010000ULL ^ ((uint64_t)keylen << 8) ^ 32ULL;
    memset(block, 0, sizeof block);
    memcpy(block, key, keylen);
    fg_b2_compress(st->h, block, 128, 0);
}

/* Digest of a non-empty message under the keyed state; out gets 32 bytes. */
static inline void fg_b2_digest(const fg_b2_state *st, const uint8_t *msg, size_t len, uint8_t out[32]) {
    uint64_t h[8];
    uint8_t block[128];
    uint64_t t = 128;
    int i;
    memcpy(h, st->h, sizeof h);
    while (len > 128) {
        t += 128;
        fg_b2_compress(h, msg, t, 0);
        msg += 128;
        len -= 128;
    }
    memset(block, 0, sizeof block);
    memcpy(block, msg, len);
    t += len;
    fg_b2_compress(h, block, t, 1);
    for (i = 0; i < 4; i++) {
        uint64_t x = h[i];
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        x = __builtin_bswap64(x);
#endif
        memcpy(out + 8 * i, &x, 8);
    }
}

static uint32_t fg_crc_table[256];
static int fg_crc_ready = 0;

static inline void fg_crc32_init(void) {
    uint32_t c, n, k;
    if (fg_crc_ready) return;
    for (n = 0; n < 256; n++) {
        c = n;
        for (k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
        fg_crc_table[n] = c;
    }
    fg_crc_ready = 1;
}

static inline uint32_t fg_crc32(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFU;
    while (n--) c = fg_crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFU;
}

/* SipHash-2-4 (Aumasson & Bernstein) of a 16-byte message given as two
 * little-endian words, under the 128-bit key (k0, k1).  The rate table places
 * address subjects with it, keyed by the arena's random salt, so where an
 * entry lands cannot be computed by anyone who only chooses the subjects. */
#define FG_SIP_ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define FG_SIP_ROUND                                                         \
    do {                                                                     \
        v0 += v1; v1 = FG_SIP_ROTL(v1, 13); v1 ^= v0; v0 = FG_SIP_ROTL(v0, 32); \
        v2 += v3; v3 = FG_SIP_ROTL(v3, 16); v3 ^= v2;                        \
        v0 += v3; v3 = FG_SIP_ROTL(v3, 21); v3 ^= v0;                        \
        v2 += v1; v1 = FG_SIP_ROTL(v1, 17); v1 ^= v2; v2 = FG_SIP_ROTL(v2, 32); \
    } while (0)

static inline uint64_t fg_sip24_2w(uint64_t k0, uint64_t k1, uint64_t m0, uint64_t m1) {
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    uint64_t b = ((uint64_t)16) << 56;
    v3 ^= m0; FG_SIP_ROUND; FG_SIP_ROUND; v0 ^= m0;
    v3 ^= m1; FG_SIP_ROUND; FG_SIP_ROUND; v0 ^= m1;
    v3 ^= b; FG_SIP_ROUND; FG_SIP_ROUND; v0 ^= b;
    v2 ^= 0xff;
    FG_SIP_ROUND; FG_SIP_ROUND; FG_SIP_ROUND; FG_SIP_ROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

#endif
