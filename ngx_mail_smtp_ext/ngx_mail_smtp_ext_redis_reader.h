
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * ngx_mail_smtp_ext: hiredis reply object functions that bound what a
 * hostile or broken Redis can make a worker allocate.  Plain hiredis, no
 * nginx headers, so that the fuzz target links it alone.
 */


#ifndef _NGX_MAIL_SMTP_EXT_REDIS_READER_H_INCLUDED_
#define _NGX_MAIL_SMTP_EXT_REDIS_READER_H_INCLUDED_


#include <stddef.h>

#include <hiredis/hiredis.h>


/*
 * The limits; fuzz/fuzz_redis.c is built with smaller ones (Makefile) so
 * that its inputs reach them without megabytes of input.
 */

/* a string (bulk, status or error) longer than this is refused */
#ifndef NGX_MAIL_SMTP_EXT_REDIS_MAX_STRING
#define NGX_MAIL_SMTP_EXT_REDIS_MAX_STRING    (1024 * 1024)
#endif

/* an array announcing more elements is refused before any allocation */
#ifndef NGX_MAIL_SMTP_EXT_REDIS_MAX_ELEMENTS
#define NGX_MAIL_SMTP_EXT_REDIS_MAX_ELEMENTS  1024
#endif

/* arrays nested deeper are refused (a top-level array is depth 1) */
#ifndef NGX_MAIL_SMTP_EXT_REDIS_MAX_DEPTH
#define NGX_MAIL_SMTP_EXT_REDIS_MAX_DEPTH     8
#endif

/*
 * memory of one top-level reply: its strings plus the objects; a single
 * string of MAX_STRING fits, 1024 x 1024 octets does not
 */
#ifndef NGX_MAIL_SMTP_EXT_REDIS_MAX_REPLY
#define NGX_MAIL_SMTP_EXT_REDIS_MAX_REPLY                                    \
    (NGX_MAIL_SMTP_EXT_REDIS_MAX_STRING + 64 * 1024)
#endif

/*
 * input the reader may hold without a complete item: hiredis buffers a
 * bulk string whole before createString sees it
 */
#ifndef NGX_MAIL_SMTP_EXT_REDIS_MAX_INPUT
#define NGX_MAIL_SMTP_EXT_REDIS_MAX_INPUT                                    \
    (NGX_MAIL_SMTP_EXT_REDIS_MAX_STRING + 64 * 1024)
#endif


typedef struct {
    /* called when a top-level reply begins; returns 0 to refuse it */
    int                (*start)(void *data);
    void                *data;

    size_t               size;      /* of the top-level reply being read */
    const char          *error;     /* the limit hit, NULL if none */

    /* an unsolicited status or error, quoted (Redis's "max clients") */
    char                 text[96];
} ngx_mail_smtp_ext_redis_reader_t;


/* makes reader r use our object functions with the state rd */
void ngx_mail_smtp_ext_redis_reader_init(redisReader *r,
    ngx_mail_smtp_ext_redis_reader_t *rd);

/* after each read: -1 (and rd->error set) if too much input is held */
int ngx_mail_smtp_ext_redis_reader_check(redisReader *r);


#endif /* _NGX_MAIL_SMTP_EXT_REDIS_READER_H_INCLUDED_ */
