/* Decode only the crop a training or evaluation view needs, straight into the batch.
 *
 * A 227x227 crop of a 256x256 JPEG needs 79% of its pixels. libjpeg-turbo can skip the rows above the
 * crop (jpeg_skip_scanlines), stop after its last row (jpeg_abort_decompress) and decode only the iMCU
 * columns that hold it (jpeg_crop_scanline). The rows land in a row buffer and are copied (mirrored when
 * asked) into `out`, a crop_h x crop_w x 3 (HWC) uint8 slot of the batch: no full image is ever made.
 *
 * Strict: anything libjpeg would only warn about (a truncated file, corrupt data) is an error here, as
 * it is in torchvision's decoder; the caller counts the sample bad. Loaded through ctypes
 * (alexnet_dist/jpeg_native.py), built on first use against the system's libjpeg(-turbo).
 */
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define RING 8 /* row buffers the decoded rows rotate through */

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} error_mgr_t;

static void fail(j_common_ptr cinfo) {
    error_mgr_t *err = (error_mgr_t *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void warn_is_fail(j_common_ptr cinfo, int level) {
    if (level < 0) fail(cinfo); /* level -1: a warning (corrupt or truncated data) */
}

/* dst[c] = src[n-1-c] for n RGB pixels. Five pixels at a time through one byte shuffle where the
 * compiler has vector extensions (a plain loop of 3-byte moves costs as much as a third of the decode);
 * src must have 16 readable bytes past its n pixels. */
static void mirror_row(uint8_t *dst, const uint8_t *src, int n) {
    int c = 0;
#if defined(__GNUC__)
    typedef uint8_t v16 __attribute__((vector_size(16)));
    for (; c + 6 <= n; c += 5) { /* byte 15 of each store is rewritten by the next step */
        v16 v;
        memcpy(&v, src + 3 * (n - 5 - c), 16);
#if defined(__clang__)
        v = __builtin_shufflevector(v, v, 12, 13, 14, 9, 10, 11, 6, 7, 8, 3, 4, 5, 0, 1, 2, 15);
#else
        const v16 reverse5 = {12, 13, 14, 9, 10, 11, 6, 7, 8, 3, 4, 5, 0, 1, 2, 15};
        v = __builtin_shuffle(v, reverse5);
#endif
        memcpy(dst + 3 * c, &v, 16);
    }
#endif
    for (; c < n; c++) {
        const uint8_t *p = src + 3 * (n - 1 - c);
        dst[3 * c] = p[0], dst[3 * c + 1] = p[1], dst[3 * c + 2] = p[2];
    }
}

/* Errors and warnings longjmp to err->jump; the setjmp itself must be in the caller's frame. */
static void strict_errors(struct jpeg_decompress_struct *cinfo, error_mgr_t *err) {
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = fail;
    err->pub.emit_message = warn_is_fail;
}

/* Reads the header: *h, *w of the image. 0 on success; else 1 and `message` says why. */
int jpeg_size(const uint8_t *data, unsigned long len, int *h, int *w, char *message, int message_len) {
    struct jpeg_decompress_struct cinfo;
    error_mgr_t err;
    strict_errors(&cinfo, &err);
    if (setjmp(err.jump)) {
        snprintf(message, (size_t)message_len, "%s", err.message);
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, len);
    jpeg_read_header(&cinfo, TRUE);
    *h = (int)cinfo.image_height;
    *w = (int)cinfo.image_width;
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* After jpeg_read_header: decodes rows [top, top+crop_h) x columns [left, left+crop_w) as RGB into out,
 * mirrored when `flip`, and releases cinfo. 0 on success; else 1 and `message` says why. The caller's
 * setjmp (in `err`) catches libjpeg's errors. */
static int decode_rows(struct jpeg_decompress_struct *cinfo, int top, int left, int crop_h, int crop_w, int flip,
                       uint8_t *out, char *message, int message_len, JSAMPLE *volatile *row) {
    cinfo->out_color_space = JCS_RGB; /* grayscale JPEGs come out as RGB too */
    jpeg_start_decompress(cinfo);
    /* Two pixels of margin each side (one chroma sample at 2x subsampling): upsampling smooths across a
     * decoded region's edge differently from across the image, so the crop's pixels must not lie on it. */
    const int margin = 2, x0 = left > margin ? left - margin : 0;
    const int x1 = left + crop_w + margin < (int)cinfo->output_width ? left + crop_w + margin : (int)cinfo->output_width;
    JDIMENSION x = (JDIMENSION)x0, width = (JDIMENSION)(x1 - x0);
    jpeg_crop_scanline(cinfo, &x, &width); /* x moves left to an iMCU boundary, width grows to match */
    const size_t shift = ((size_t)left - x) * 3, bytes = (size_t)crop_w * 3;
    /* Rows go through a ring of RING row buffers, not one: with a single buffer at a fixed address, the
     * colour converter's stores into it and its loads from libjpeg's own buffers fell on the same 4 KB
     * offsets in some processes (depending on where malloc put them), and the decode ran almost twice as
     * slow there. Eight rows at a stride that is not a multiple of 4 KB: the same speed in every process. */
    size_t stride = (size_t)cinfo->output_width * 3 + 16; /* + 16: mirror_row reads past the row */
    if (stride % 4096 < 512 || stride % 4096 > 3584) stride += 1024; /* the rows must spread over 4 KB */
    *row = malloc(stride * RING);
    if (!*row) {
        snprintf(message, (size_t)message_len, "out of memory");
        jpeg_destroy_decompress(cinfo);
        return 1;
    }
    if (top > 0 && jpeg_skip_scanlines(cinfo, (JDIMENSION)top) != (JDIMENSION)top) {
        snprintf(message, (size_t)message_len, "image ends before row %d", top);
        jpeg_destroy_decompress(cinfo);
        return 1;
    }
    for (int r = 0; r < crop_h; r++) {
        uint8_t *cur = *row + (size_t)(r % RING) * stride;
        JSAMPROW rows[1] = {cur};
        if (jpeg_read_scanlines(cinfo, rows, 1) != 1) {
            snprintf(message, (size_t)message_len, "image ends at row %d", top + r);
            jpeg_destroy_decompress(cinfo);
            return 1;
        }
        uint8_t *dst = out + (size_t)r * bytes;
        const uint8_t *src = cur + shift;
        if (flip)
            mirror_row(dst, src, crop_w);
        else
            memcpy(dst, src, bytes);
    }
    jpeg_abort_decompress(cinfo); /* the rows below the crop are never decoded */
    jpeg_destroy_decompress(cinfo);
    return 0;
}

/* Where a view lies: given by the caller (`given`), or placed from the image's size once the header is read:
 * the centre, or at (draw_top mod (h-crop_h+1), draw_left mod (w-crop_w+1)). */
typedef struct {
    int given, center, top, left, crop_h, crop_w, flip;
    uint64_t draw_top, draw_left;
} view_t;

/* Reads the header, places the view (0; 1 with `message` when a given crop lies outside the image; 2 when
 * the image is smaller than a placed one) and decodes it into out. The one setjmp for both entry points. */
static int decode_view(const uint8_t *data, unsigned long len, const view_t *v, uint8_t *out, char *message,
                       int message_len) {
    struct jpeg_decompress_struct cinfo;
    error_mgr_t err;
    JSAMPLE *volatile row = NULL;
    strict_errors(&cinfo, &err);
    if (setjmp(err.jump)) {
        snprintf(message, (size_t)message_len, "%s", err.message);
        jpeg_destroy_decompress(&cinfo);
        free(row);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, len);
    jpeg_read_header(&cinfo, TRUE);
    const int h = (int)cinfo.image_height, w = (int)cinfo.image_width;
    int top = v->top, left = v->left;
    if (v->given) {
        if (top < 0 || left < 0 || v->crop_h < 1 || v->crop_w < 1 || top + v->crop_h > h ||
            left + v->crop_w > w) {
            snprintf(message, (size_t)message_len, "crop %dx%d at (%d, %d) outside the %dx%d image", v->crop_h,
                     v->crop_w, top, left, h, w);
            jpeg_destroy_decompress(&cinfo);
            return 1;
        }
    } else {
        if (v->crop_h < 1 || v->crop_w < 1 || h < v->crop_h || w < v->crop_w) {
            jpeg_destroy_decompress(&cinfo);
            return 2;
        }
        top = v->center ? (h - v->crop_h) / 2 : (int)(v->draw_top % (uint64_t)(h - v->crop_h + 1));
        left = v->center ? (w - v->crop_w) / 2 : (int)(v->draw_left % (uint64_t)(w - v->crop_w + 1));
    }
    const int status =
        decode_rows(&cinfo, top, left, v->crop_h, v->crop_w, v->flip, out, message, message_len, &row);
    free(row);
    return status;
}

/* Decodes rows [top, top+crop_h) x columns [left, left+crop_w) as RGB into out (HWC), mirrored left-right
 * when `flip`. 0 on success; else 1 and `message` says why (the crop must lie inside the image). */
int jpeg_decode_crop(const uint8_t *data, unsigned long len, int top, int left, int crop_h, int crop_w, int flip,
                     uint8_t *out, char *message, int message_len) {
    const view_t v = {.given = 1, .top = top, .left = left, .crop_h = crop_h, .crop_w = crop_w, .flip = flip};
    return decode_view(data, len, &v, out, message, message_len);
}

/* One loader view in one call (the header is read once): a crop x crop square at (draw_top mod (h-crop+1),
 * draw_left mod (w-crop+1)), the same arithmetic as augment.train_params, or the centre when `center`;
 * mirrored when `flip`. 0 on success; 2 when the image is smaller than the crop (nothing written: the
 * caller decodes it whole and upscales); else 1 and `message` says why. */
int jpeg_decode_view(const uint8_t *data, unsigned long len, int crop, int center, uint64_t draw_top,
                     uint64_t draw_left, int flip, uint8_t *out, char *message, int message_len) {
    const view_t v = {.center = center, .crop_h = crop, .crop_w = crop, .flip = flip, .draw_top = draw_top,
                      .draw_left = draw_left};
    return decode_view(data, len, &v, out, message, message_len);
}

/* A batch's views in one call (the loader's path): image i is blob[offsets[i], offsets[i] + lens[i]), placed
 * from draws[2i], draws[2i+1] (NULL: every view at the centre) and mirrored when flips[i] (NULL: none).
 * The views that decode go to consecutive slots of dst, slot_bytes apart, in order; status[i] is 0 for
 * those, 1 for a corrupt image (its message at messages + i * message_len) and 2 for one smaller than the
 * crop (both left out of dst). Returns the number of slots written: one call a batch, not one an image. */
int jpeg_decode_views(int n, const uint8_t *blob, const int64_t *offsets, const int64_t *lens, int crop,
                      const uint64_t *draws, const uint8_t *flips, uint8_t *dst, int64_t slot_bytes, int32_t *status,
                      char *messages, int message_len) {
    int written = 0;
    for (int i = 0; i < n; i++) {
        const view_t v = {.center = draws == NULL, .crop_h = crop, .crop_w = crop, .flip = flips ? flips[i] : 0,
                          .draw_top = draws ? draws[2 * i] : 0, .draw_left = draws ? draws[2 * i + 1] : 0};
        status[i] = decode_view(blob + offsets[i], (unsigned long)lens[i], &v, dst + (size_t)written * slot_bytes,
                                messages + (size_t)i * message_len, message_len);
        written += status[i] == 0;
    }
    return written;
}
