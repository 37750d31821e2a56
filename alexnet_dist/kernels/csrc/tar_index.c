/* Index the tar members lying whole in a buffer (alexnet_dist/data/tar.py).
 *
 * The loader reads a shard in 1 MB pieces and parses each 512-byte header, three members a sample. Here
 * one call indexes every complete member in the buffer; Python only slices the names and data out.
 *
 * For each member whose header and data both lie in buf[pos, len), one row of five int64:
 *   header offset, data size, type flag (byte 156), name length (bytes 0-99 up to the first NUL),
 *   ustar prefix length (bytes 345-499 up to the first NUL; 0 when not ustar).
 * Returns the number of rows (at most cap). *next: where the first member not indexed starts (it may lie
 * past len: the padding after the last member's data). *status: 0 = stopped at an incomplete member or
 * at cap, 1 = end of archive (a zero block), 2 = a header whose size field is not a number.
 */
#include <stdint.h>
#include <string.h>

static int parse_size(const uint8_t *field, int64_t *size) {
    if (field[0] & 0x80) { /* base-256 (GNU, files over 8 GB): big-endian in the remaining 11 bytes */
        int64_t v = 0;
        for (int i = 1; i < 12; i++) v = (v << 8) | field[i];
        *size = v;
        return 0;
    }
    int i = 0;
    while (i < 12 && field[i] == ' ') i++; /* leading spaces, as Python's strip() */
    int64_t v = 0;
    int digits = 0;
    for (; i < 12 && field[i] >= '0' && field[i] <= '7'; i++, digits++) v = v * 8 + (field[i] - '0');
    for (; i < 12 && field[i] == ' '; i++) {} /* trailing spaces */
    if (i < 12 && field[i] != 0) return -1;   /* anything else before the NUL: not a number */
    *size = digits ? v : 0;
    return 0;
}

static int64_t cstrlen(const uint8_t *s, int64_t max) {
    const uint8_t *z = memchr(s, 0, (size_t)max);
    return z ? z - s : max;
}

int64_t tar_index(const uint8_t *buf, int64_t len, int64_t pos, int64_t *out, int64_t cap, int64_t *next,
                  int32_t *status) {
    static const uint8_t zero[512];
    int64_t n = 0;
    *status = 0;
    while (n < cap && pos + 512 <= len) {
        const uint8_t *h = buf + pos;
        if (memcmp(h, zero, 512) == 0) {
            *status = 1;
            break;
        }
        int64_t size;
        if (parse_size(h + 124, &size) || size < 0) {
            *status = 2;
            break;
        }
        if (pos + 512 + size > len) break; /* data not all here yet */
        int64_t *row = out + 5 * n++;
        row[0] = pos;
        row[1] = size;
        row[2] = h[156];
        row[3] = cstrlen(h, 100);
        row[4] = memcmp(h + 257, "ustar", 5) == 0 ? cstrlen(h + 345, 155) : 0;
        pos += 512 + size + ((512 - size % 512) % 512);
    }
    *next = pos;
    return n;
}
