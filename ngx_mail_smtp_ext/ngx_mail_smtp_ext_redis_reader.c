
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * The object functions of a hiredis reader, as hiredis's own but with
 * limits checked before anything is allocated.  A refusal returns NULL:
 * the reader fails with "Out of memory", frees the partial reply (every
 * object is linked into its parent when created) and the caller drops the
 * connection; rd->error says which limit it was.
 *
 * Objects are plain redisReply structures from malloc(), so hiredis's
 * freeReplyObject() and ours are interchangeable.
 */


#include <stdlib.h>
#include <string.h>

#include "ngx_mail_smtp_ext_redis_reader.h"


static void *ngx_mail_smtp_ext_redis_create_string(const redisReadTask *task,
    char *str, size_t len);
static void *ngx_mail_smtp_ext_redis_create_array(const redisReadTask *task,
    int elements);
static void *ngx_mail_smtp_ext_redis_create_integer(
    const redisReadTask *task, long long value);
static void *ngx_mail_smtp_ext_redis_create_nil(const redisReadTask *task);
static void ngx_mail_smtp_ext_redis_free_object(void *obj);
static redisReply *ngx_mail_smtp_ext_redis_create(const redisReadTask *task,
    int type, size_t extra);


static void ngx_mail_smtp_ext_redis_quote(
    ngx_mail_smtp_ext_redis_reader_t *rd, int type, const char *str,
    size_t len);


static const char  ngx_mail_smtp_ext_redis_unsolicited[] =
    "unsolicited reply";


static redisReplyObjectFunctions  ngx_mail_smtp_ext_redis_reader_fns = {
    ngx_mail_smtp_ext_redis_create_string,
    ngx_mail_smtp_ext_redis_create_array,
    ngx_mail_smtp_ext_redis_create_integer,
    ngx_mail_smtp_ext_redis_create_nil,
    ngx_mail_smtp_ext_redis_free_object
};


void
ngx_mail_smtp_ext_redis_reader_init(redisReader *r,
    ngx_mail_smtp_ext_redis_reader_t *rd)
{
    /* nothing has been read yet: no object of the old functions exists */

    rd->size = 0;
    rd->error = NULL;

    r->fn = &ngx_mail_smtp_ext_redis_reader_fns;
    r->privdata = rd;
}


int
ngx_mail_smtp_ext_redis_reader_check(redisReader *r)
{
    ngx_mail_smtp_ext_redis_reader_t  *rd;

    if (r->buf == NULL || r->len <= r->pos
        || r->len - r->pos <= NGX_MAIL_SMTP_EXT_REDIS_MAX_INPUT)
    {
        return 0;
    }

    rd = r->privdata;

    if (rd && rd->error == NULL) {
        rd->error = "reply over 1 MiB";
    }

    return -1;
}


/*
 * Every object passes here: it is counted against the reply's size, and
 * a top-level one must be expected by the caller.  extra is the memory
 * beyond the structure (the string or the element pointers).
 */

static redisReply *
ngx_mail_smtp_ext_redis_create(const redisReadTask *task, int type,
    size_t extra)
{
    redisReply                        *reply, *parent;
    ngx_mail_smtp_ext_redis_reader_t  *rd;

    rd = task->privdata;

    if (task->parent == NULL) {
        rd->size = 0;

        if (rd->start && !rd->start(rd->data)) {
            rd->error = ngx_mail_smtp_ext_redis_unsolicited;
            return NULL;
        }
    }

    if (extra > NGX_MAIL_SMTP_EXT_REDIS_MAX_REPLY
        || rd->size + sizeof(redisReply) + extra
           > NGX_MAIL_SMTP_EXT_REDIS_MAX_REPLY)
    {
        rd->error = "reply over 1 MiB";
        return NULL;
    }

    reply = calloc(1, sizeof(redisReply));
    if (reply == NULL) {
        rd->error = "out of memory";
        return NULL;
    }

    reply->type = type;
    rd->size += sizeof(redisReply) + extra;

    if (task->parent) {
        /* hiredis made the parent with these functions: a redisReply */
        parent = task->parent->obj;
        parent->element[task->idx] = reply;
    }

    return reply;
}


static void *
ngx_mail_smtp_ext_redis_create_string(const redisReadTask *task, char *str,
    size_t len)
{
    char                              *s;
    redisReply                        *reply;
    ngx_mail_smtp_ext_redis_reader_t  *rd;

    rd = task->privdata;

    /* before str is touched: hiredis 0.14 does not check len itself */

    if (len > NGX_MAIL_SMTP_EXT_REDIS_MAX_STRING) {
        rd->error = "string over 1 MiB in reply";
        return NULL;
    }

    s = malloc(len + 1);
    if (s == NULL) {
        rd->error = "out of memory";
        return NULL;
    }

    reply = ngx_mail_smtp_ext_redis_create(task, task->type, len + 1);
    if (reply == NULL) {
        free(s);

        if (task->parent == NULL && task->type != REDIS_REPLY_STRING
            && rd->error == ngx_mail_smtp_ext_redis_unsolicited)
        {
            ngx_mail_smtp_ext_redis_quote(rd, task->type, str, len);
        }

        return NULL;
    }

    memcpy(s, str, len);
    s[len] = '\0';

    reply->str = s;
    reply->len = len;

    return reply;
}


/*
 * A Redis that refuses a client says so in an error it sends unasked
 * ("-ERR max number of clients reached"): keep it for the log, printable
 * and short.
 */

static void
ngx_mail_smtp_ext_redis_quote(ngx_mail_smtp_ext_redis_reader_t *rd,
    int type, const char *str, size_t len)
{
    char        *p, *last;
    size_t       i;
    const char  *prefix;

    prefix = "unsolicited reply \"";

    p = rd->text;
    last = rd->text + sizeof(rd->text) - 3;    /* room for '"' and NUL */

    while (*prefix && p < last) {
        *p++ = *prefix++;
    }

    if (p < last) {
        *p++ = (type == REDIS_REPLY_ERROR) ? '-' : '+';
    }

    for (i = 0; i < len && p < last; i++) {
        *p++ = (str[i] >= 0x20 && str[i] < 0x7f) ? str[i] : '?';
    }

    *p++ = '"';
    *p = '\0';

    rd->error = rd->text;
}


static void *
ngx_mail_smtp_ext_redis_create_array(const redisReadTask *task, int elements)
{
    int                                depth;
    redisReply                        *reply;
    redisReply                       **element;
    const redisReadTask               *t;
    ngx_mail_smtp_ext_redis_reader_t  *rd;

    rd = task->privdata;

    /* hiredis 0.14 passes the announced count as is: negative, huge */

    if (elements < 0 || elements > NGX_MAIL_SMTP_EXT_REDIS_MAX_ELEMENTS) {
        rd->error = "array over 1024 elements in reply";
        return NULL;
    }

    depth = 1;

    for (t = task->parent; t; t = t->parent) {
        depth++;
    }

    if (depth > NGX_MAIL_SMTP_EXT_REDIS_MAX_DEPTH) {
        rd->error = "arrays nested over 8 levels in reply";
        return NULL;
    }

    element = NULL;

    if (elements > 0) {
        element = calloc(elements, sizeof(redisReply *));
        if (element == NULL) {
            rd->error = "out of memory";
            return NULL;
        }
    }

    reply = ngx_mail_smtp_ext_redis_create(task, REDIS_REPLY_ARRAY,
                                           elements * sizeof(redisReply *));
    if (reply == NULL) {
        free(element);
        return NULL;
    }

    reply->element = element;
    reply->elements = elements;

    return reply;
}


static void *
ngx_mail_smtp_ext_redis_create_integer(const redisReadTask *task,
    long long value)
{
    redisReply  *reply;

    reply = ngx_mail_smtp_ext_redis_create(task, REDIS_REPLY_INTEGER, 0);
    if (reply == NULL) {
        return NULL;
    }

    reply->integer = value;

    return reply;
}


static void *
ngx_mail_smtp_ext_redis_create_nil(const redisReadTask *task)
{
    return ngx_mail_smtp_ext_redis_create(task, REDIS_REPLY_NIL, 0);
}


static void
ngx_mail_smtp_ext_redis_free_object(void *obj)
{
    size_t       i;
    redisReply  *reply;

    reply = obj;

    if (reply == NULL) {
        return;
    }

    /* depth is bounded by MAX_DEPTH: the recursion is too */

    if (reply->element) {
        for (i = 0; i < reply->elements; i++) {
            ngx_mail_smtp_ext_redis_free_object(reply->element[i]);
        }

        free(reply->element);
    }

    free(reply->str);
    free(reply);
}
