
/*
 * ngx_mail_smtp_ext: per-worker hiredis async connections on the nginx
 * event loop.
 */


#ifndef _NGX_MAIL_SMTP_EXT_REDIS_H_INCLUDED_
#define _NGX_MAIL_SMTP_EXT_REDIS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include <hiredis/hiredis.h>


#define NGX_MAIL_SMTP_EXT_REDIS_TIMEOUT  1000


/* smtp_ext_redis_sentinel NAME ADDR ... [password=S] */
typedef struct {
    ngx_str_t                   name;
    ngx_array_t                 addrs;     /* ngx_addr_t */
    ngx_str_t                   password;
} ngx_mail_smtp_ext_redis_sentinel_t;


typedef struct {
    ngx_str_t                   name;      /* ADDR as written, for logs */
    ngx_str_t                   sentinel_name;  /* "sentinel:NAME" */
    ngx_mail_smtp_ext_redis_sentinel_t  *sentinel;
    ngx_str_t                   host;      /* IP text, NUL-terminated */
    in_port_t                   port;
    ngx_str_t                   unix_path; /* NUL-terminated, or empty */
    ngx_uint_t                  db;
    ngx_str_t                   password;
    ngx_str_t                   prefix;
    ngx_msec_t                  timeout;
    ngx_uint_t                  index;     /* per-worker connection slot */
} ngx_mail_smtp_ext_redis_conf_t;


/*
 * replies == NULL: Redis down, connection error or timeout; otherwise all
 * n replies (REDIS_REPLY_ERROR included), valid only during the call.
 */
typedef void (*ngx_mail_smtp_ext_redis_handler_pt)(void *data,
    redisReply **replies, ngx_uint_t n);


typedef struct {
    int                         argc;
    const char                **argv;
    const size_t               *argvlen;
} ngx_mail_smtp_ext_redis_cmd_t;


/*
 * Parses "smtp_ext_redis ADDR [db=N] [password=S] [prefix=S] [timeout=T]"
 * from cf->args; "servers" is an array of ngx_mail_smtp_ext_redis_conf_t *
 * (created on first use if servers->nalloc == 0).
 */
char *ngx_mail_smtp_ext_redis_parse(ngx_conf_t *cf, ngx_array_t *servers,
    ngx_mail_smtp_ext_redis_conf_t **rcfp);

/*
 * "smtp_ext_redis_sentinel NAME ADDR ... [password=S]"; "sentinels" is an
 * array of ngx_mail_smtp_ext_redis_sentinel_t (created on first use).
 */
char *ngx_mail_smtp_ext_redis_sentinel_parse(ngx_conf_t *cf,
    ngx_array_t *sentinels);

/* after the mail block: every "sentinel:NAME" must name a sentinel */
char *ngx_mail_smtp_ext_redis_sentinel_resolve(ngx_conf_t *cf,
    ngx_array_t *servers, ngx_array_t *sentinels);

ngx_int_t ngx_mail_smtp_ext_redis_init_process(ngx_cycle_t *cycle,
    ngx_array_t *servers);
void ngx_mail_smtp_ext_redis_exit_process(ngx_cycle_t *cycle);

/*
 * Sends n commands pipelined (argv is copied at once); the handler is
 * called exactly once, never from inside this call, and never after the
 * pool is destroyed.  NGX_ERROR: no memory or no server, no call.
 */
ngx_int_t ngx_mail_smtp_ext_redis_query(ngx_mail_smtp_ext_redis_conf_t *rcf,
    ngx_pool_t *pool, ngx_mail_smtp_ext_redis_cmd_t *cmds, ngx_uint_t n,
    ngx_mail_smtp_ext_redis_handler_pt handler, void *data);

/* key = prefix + kind + name (name lower-cased if lowcase) */
ngx_int_t ngx_mail_smtp_ext_redis_key(ngx_pool_t *pool,
    ngx_mail_smtp_ext_redis_conf_t *rcf, const char *kind, ngx_str_t *name,
    ngx_uint_t lowcase, ngx_str_t *key);


#endif /* _NGX_MAIL_SMTP_EXT_REDIS_H_INCLUDED_ */
