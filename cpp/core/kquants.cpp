// Dequantization of the GGUF types the kernels do not compute with yet: the 5-bit legacy types and
// the K-quants (super-blocks of 256 with per-sub-block scales). Models holding them are converted
// at load (Model::converted); the element order and arithmetic follow the GGUF block layouts, with
// float products in the order of the reference dequantizers, so values are bit for bit theirs.
#include "core/kquants.h"

#include "core/quants.h"

namespace tmill {

namespace {

float half(const uint8_t* p) { return fp16_to_fp32(static_cast<uint16_t>(p[0] | (p[1] << 8))); }
uint32_t le32(const uint8_t* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24); }

// q5_0 [d f16][qh u32][qs 16]: x_i = d * (q_i - 16); q5_1 [d][m][qh][qs]: x_i = d * q_i + m, where q_i's
// low four bits are qs[i] (i < 16) or qs[i - 16] >> 4, its fifth bit qh bit i.
void q5(const uint8_t* b, bool with_min, float* out) {
    const float d = half(b), m = with_min ? half(b + 2) : 0.0f;
    const uint8_t* p = b + (with_min ? 4 : 2);
    const uint32_t qh = le32(p);
    const uint8_t* qs = p + 4;
    for (int i = 0; i < 32; ++i) {
        const int q = ((i < 16 ? qs[i] : qs[i - 16] >> 4) & 0x0F) | (((qh >> i) & 1) << 4);
        out[i] = with_min ? d * static_cast<float>(q) + m : d * static_cast<float>(q - 16);
    }
}

// Q4_K / Q5_K scales: 8 sub-blocks, a 6-bit scale and a 6-bit min each, packed in 12 bytes.
void scale_min_k4(const uint8_t* s, int j, int& sc, int& mn) {
    if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// q2_k [scales 16][qs 64][d][dmin]: element e = 128 h + 32 s + l is (qs[32 h + l] >> 2 s) & 3 in
// sub-block e / 16, whose scale byte holds d's multiplier (low nibble) and dmin's (high).
void q2k(const uint8_t* b, float* out) {
    const uint8_t *scales = b, *qs = b + 16;
    const float d = half(b + 80), dmin = half(b + 82);
    for (int e = 0; e < 256; ++e) {
        const int h = e / 128, s = (e % 128) / 32, l = e % 32, sub = e / 16;
        const float dl = d * static_cast<float>(scales[sub] & 0x0F), ml = dmin * static_cast<float>(scales[sub] >> 4);
        out[e] = dl * static_cast<float>((qs[32 * h + l] >> (2 * s)) & 3) - ml;
    }
}

// q3_k [hmask 32][qs 64][scales 12][d]: 16 signed 6-bit scales (low nibbles in bytes 0-7, high pairs
// in bytes 8-11); q = ((qs >> 2 s) & 3) - (hmask bit clear ? 4 : 0).
void q3k(const uint8_t* b, float* out) {
    const uint8_t *hmask = b, *qs = b + 32, *sc = b + 96;
    const float d = half(b + 108);
    float dl[16];
    for (int k = 0; k < 16; ++k) {
        const int low = (k < 8 ? sc[k] : sc[k - 8] >> 4) & 0x0F, high = (sc[8 + k % 4] >> (2 * (k / 4))) & 3;
        dl[k] = d * static_cast<float>(static_cast<int8_t>((low | (high << 4))) - 32);
    }
    for (int e = 0; e < 256; ++e) {
        const int h = e / 128, s = (e % 128) / 32, l = e % 32;
        const int low = (qs[32 * h + l] >> (2 * s)) & 3, bit = (hmask[e % 32] >> (e / 32)) & 1;
        out[e] = dl[e / 16] * static_cast<float>(low - (bit ? 0 : 4));
    }
}

// q4_k [d][dmin][scales 12][qs 128] and q5_k [d][dmin][scales 12][qh 32][qs 128]: sub-block b of 32
// (b = 2 c + s) takes (qs[32 c + l] >> 4 s) & 15 (plus qh bit b of byte l as the fifth bit);
// x = d * sc_b * q - dmin * m_b.
void q45k(const uint8_t* b, bool five, float* out) {
    const float d = half(b), dmin = half(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qh = five ? b + 16 : nullptr;
    const uint8_t* qs = b + (five ? 48 : 16);
    for (int sub = 0; sub < 8; ++sub) {
        int sc = 0, mn = 0;
        scale_min_k4(scales, sub, sc, mn);
        const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
        const int c = sub / 2, shift = 4 * (sub % 2);
        for (int l = 0; l < 32; ++l) {
            int q = (qs[32 * c + l] >> shift) & 0x0F;
            if (five) q |= ((qh[l] >> sub) & 1) << 4;
            out[32 * sub + l] = dl * static_cast<float>(q) - ml;
        }
    }
}

// q6_k [ql 128][qh 64][scales 16 int8][d]: element e = 128 h + r takes its low four bits from
// ql[64 h + r % 64] (>> 4 when r >= 64) and its high two from qh[32 h + r % 32] >> 2 (r / 32);
// x = d * scale[e / 16] * (q - 32).
void q6k(const uint8_t* b, float* out) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half(b + 208);
    for (int e = 0; e < 256; ++e) {
        const int h = e / 128, r = e % 128;
        const int low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F, high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
        out[e] = d * static_cast<float>(scales[e / 16]) * static_cast<float>((low | (high << 4)) - 32);
    }
}

}  // namespace

bool dequantizes_only(DType t) {
    switch (t) {
        case DType::q5_0: case DType::q5_1: case DType::q2_k: case DType::q3_k: case DType::q4_k: case DType::q5_k:
        case DType::q6_k:
            return true;
        default:
            return false;
    }
}

void dequantize_row_extra(DType t, const void* row, float* out, int64_t n) {
    const uint8_t* p = static_cast<const uint8_t*>(row);
    const DTypeInfo info = dtype_info(t);
    for (int64_t i = 0; i < n / info.block_size; ++i, p += info.block_bytes, out += info.block_size) {
        switch (t) {
            case DType::q5_0: q5(p, false, out); break;
            case DType::q5_1: q5(p, true, out); break;
            case DType::q2_k: q2k(p, out); break;
            case DType::q3_k: q3k(p, out); break;
            case DType::q4_k: q45k(p, false, out); break;
            case DType::q5_k: q45k(p, true, out); break;
            case DType::q6_k: q6k(p, out); break;
            default: return;
        }
    }
}

}  // namespace tmill
