
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * libFuzzer target of the Redis reply reader: hiredis's parser with our
 * object functions and limits (ngx_mail_smtp_ext_redis_reader.c), the
 * limits made small by the Makefile (a 4096-octet string, 64 elements,
 * depth 5) so that inputs of a few K reach them.
 *
 * Input: 3 control octets, then the octets a Redis server sends.
 *   0: the number of top-level replies expected (0-127; a further one is
 *      "unsolicited" and must be refused); bit 7 set: repeat the input's
 *      last 64 octets in reads of READ_MAX, up to the third octet x
 *      READ_MAX octets (an endless stream, past the limits)
 *   1: the size of each read (1-256; 0 = all at once)
 *   2: the repeat count (see above)
 *
 * The input is fed read by read as the module does; after each read the
 * held input is checked and the complete replies are taken.  An error
 * (refused reply, protocol error, too much input) starts a new reader,
 * like the module's reconnect, with the rest of the input.
 *
 * Checked beyond memory safety and leaks: no reply breaks a limit (string
 * length, elements, depth, total size), a reply's size is what the reader
 * counted, no element is missing, strings are NUL-terminated, no reply
 * beyond the expected ones is ever produced, and the input held stays
 * under MAX_INPUT + one read.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

#include "ngx_mail_smtp_ext_redis_reader.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


/* redisBufferRead() reads 16K; scaled as the limits (Makefile) are */
#define READ_MAX  1024


typedef struct {
    redisReader                       *reader;
    ngx_mail_smtp_ext_redis_reader_t   rd;
    unsigned                           expected;
    unsigned                           started;
    unsigned                           returned;
} fuzz_conn_t;


static void
fail(const char *what)
{
    fprintf(stderr, "fuzz_redis: %s\n", what);
    abort();
}


static int
fuzz_start(void *data)
{
    fuzz_conn_t  *fc = data;

    if (fc->started >= fc->expected) {
        return 0;
    }

    fc->started++;

    return 1;
}


static void
fuzz_open(fuzz_conn_t *fc)
{
    fc->reader = redisReaderCreate();
    if (fc->reader == NULL) {
        fail("redisReaderCreate");
    }

    ngx_mail_smtp_ext_redis_reader_init(fc->reader, &fc->rd);
    fc->rd.start = fuzz_start;
    fc->rd.data = fc;
    fc->started = 0;
    fc->returned = 0;
}


static size_t
fuzz_check(redisReply *r, int depth)
{
    size_t  size, i;

    if (r == NULL) {
        fail("missing element");
    }

    size = sizeof(redisReply);

    switch (r->type) {

    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR:
        if (r->str == NULL || r->len > NGX_MAIL_SMTP_EXT_REDIS_MAX_STRING) {
            fail("string over the limit");
        }

        if (r->str[r->len] != '\0') {
            fail("string not terminated");
        }

        size += r->len + 1;
        break;

    case REDIS_REPLY_ARRAY:
        if (depth > NGX_MAIL_SMTP_EXT_REDIS_MAX_DEPTH) {
            fail("array nested too deep");
        }

        if (r->elements > NGX_MAIL_SMTP_EXT_REDIS_MAX_ELEMENTS) {
            fail("array over the limit");
        }

        if ((r->elements == 0) != (r->element == NULL)) {
            fail("array elements inconsistent");
        }

        size += r->elements * sizeof(redisReply *);

        for (i = 0; i < r->elements; i++) {
            size += fuzz_check(r->element[i], depth + 1);
        }

        break;

    case REDIS_REPLY_INTEGER:
    case REDIS_REPLY_NIL:
        if (r->str || r->element) {
            fail("scalar with a string or elements");
        }

        break;

    default:
        fail("unknown reply type");
    }

    return size;
}


/* one read: feed, bound, take the replies; -1 if the reader failed */

static int
fuzz_read(fuzz_conn_t *fc, const uint8_t *p, size_t n)
{
    void    *reply;
    size_t   size;

    if (redisReaderFeed(fc->reader, (const char *) p, n) != REDIS_OK) {
        return -1;
    }

    for ( ;; ) {
        if (redisReaderGetReply(fc->reader, &reply) != REDIS_OK) {
            return -1;
        }

        if (reply == NULL) {
            break;
        }

        if (++fc->returned > fc->expected) {
            fail("a reply beyond the expected ones");
        }

        size = fuzz_check(reply, 1);

        if (size > NGX_MAIL_SMTP_EXT_REDIS_MAX_REPLY) {
            fail("reply over the size limit");
        }

        if (size != fc->rd.size) {
            fail("reply size is not what the reader counted");
        }

        fc->reader->fn->freeObject(reply);
    }

    /* the module's check after each read */

    if (ngx_mail_smtp_ext_redis_reader_check(fc->reader) != 0) {
        if (fc->rd.error == NULL) {
            fail("check failed without an error");
        }

        return -1;
    }

    if (fc->reader->len - fc->reader->pos
        > NGX_MAIL_SMTP_EXT_REDIS_MAX_INPUT)
    {
        fail("input held over the limit");
    }

    return 0;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t        chunk, n, pos, tail, total, limit;
    unsigned      expected;
    fuzz_conn_t   fc;
    uint8_t       buf[READ_MAX];

    if (size < 3) {
        return 0;
    }

    expected = data[0] & 0x7f;
    chunk = data[1] ? data[1] : size;
    limit = (data[0] & 0x80) ? (size_t) data[2] * READ_MAX : 0;

    data += 3;
    size -= 3;

    memset(&fc, 0, sizeof(fuzz_conn_t));
    fc.expected = expected;

    fuzz_open(&fc);

    for (pos = 0; pos < size; pos += n) {
        n = size - pos < chunk ? size - pos : chunk;

        if (fuzz_read(&fc, data + pos, n) != 0) {
            /* what the module logs */
            if (fc.rd.error
                && strlen(fc.rd.error) >= sizeof(fc.rd.text))
            {
                fail("error text too long");
            }

            /* the module drops the connection and reconnects */
            redisReaderFree(fc.reader);
            fuzz_open(&fc);
        }
    }

    /* an endless stream: the input's tail again and again */

    tail = size < 64 ? size : 64;

    for (total = 0; tail && total < limit; total += READ_MAX) {
        for (n = 0; n < READ_MAX; n++) {
            buf[n] = data[size - tail + n % tail];
        }

        if (fuzz_read(&fc, buf, READ_MAX) != 0) {
            break;
        }
    }

    redisReaderFree(fc.reader);

    return 0;
}
