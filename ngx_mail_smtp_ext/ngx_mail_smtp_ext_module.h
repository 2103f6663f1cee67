
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


#ifndef _NGX_MAIL_SMTP_EXT_MODULE_H_INCLUDED_
#define _NGX_MAIL_SMTP_EXT_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_event_connect.h>
#include <ngx_mail.h>

#include "ngx_smtp_core.h"
#include "ngx_mail_smtp_ext_redis.h"
#include "ngx_mail_smtp_ext_passwd.h"
#include "ngx_mail_smtp_ext_metrics.h"


#define NGX_MAIL_SMTP_EXT_AUTH_PLAIN       0x02
#define NGX_MAIL_SMTP_EXT_AUTH_LOGIN       0x04
#define NGX_MAIL_SMTP_EXT_AUTH_CRAM_MD5    0x08

#define NGX_MAIL_SMTP_EXT_TLS_OFF          0
#define NGX_MAIL_SMTP_EXT_TLS_ON           1
#define NGX_MAIL_SMTP_EXT_TLS_REQUIRED     2

/* buffer sizes: commands, DATA in each direction, backend replies */
#define NGX_MAIL_SMTP_EXT_CMD_BUF          NGX_SMTP_MAX_LINE
#define NGX_MAIL_SMTP_EXT_DATA_BUF         32768
#define NGX_MAIL_SMTP_EXT_DATA_IN_BUF      32768
#define NGX_MAIL_SMTP_EXT_DIRECT_MIN       2048  /* zero-copy DATA run */
#define NGX_MAIL_SMTP_EXT_REPLY_BUF        4096
#define NGX_MAIL_SMTP_EXT_HELO_MAX         255

/* run-time IP:port routes a session may hold at once (route.c) */
#define NGX_MAIL_SMTP_EXT_HOLDS            8


/* worker process slots whose connections a pool zone tracks apart */
#define NGX_MAIL_SMTP_EXT_WSLOTS           32


/*
 * A peer's run-time state: per worker, or with "zone" in shared memory
 * for all workers of the node (then read and written under the zone's
 * lock; the counters with atomics).
 */
typedef struct {
    /* balancing, as ngx_http_upstream_round_robin */
    ngx_int_t                       current_weight;
    ngx_int_t                       effective_weight;
    ngx_uint_t                      fails;
    time_t                          checked;    /* fail_timeout clock */
    ngx_uint_t                      conns;      /* cached idle ones too */
    ngx_uint_t                      wconns[NGX_MAIL_SMTP_EXT_WSLOTS];
                                                /* conns per worker slot:
                                                   a killed worker's are
                                                   given back */

    /* active health checks */
    ngx_uint_t                      hc_fails;   /* in a row */
    ngx_uint_t                      hc_passes;  /* in a row */
    ngx_msec_t                      hc_next;    /* the next probe is due */
    ngx_msec_t                      hc_started; /* a probe under way */
    ngx_pid_t                       hc_owner;   /* the worker probing */
    ngx_uint_t                      unhealthy;

    /* counters, for metrics */
    ngx_atomic_t                    selected;
    ngx_atomic_t                    failures;
    ngx_atomic_t                    hc_ok;
    ngx_atomic_t                    hc_failed;
} ngx_mail_smtp_ext_peer_state_t;


typedef struct {
    struct sockaddr                *sockaddr;
    socklen_t                       socklen;
    ngx_str_t                       name;       /* IP:port */
    ngx_str_t                       server;     /* as written */

    ngx_uint_t                      weight;
    ngx_uint_t                      max_fails;
    time_t                          fail_timeout;
    ngx_uint_t                      max_conns;
    unsigned                        backup:1;
    unsigned                        down:1;

    ngx_mail_smtp_ext_peer_state_t *shared;     /* in the zone, or NULL */
    ngx_mail_smtp_ext_peer_state_t  local;      /* without a zone */
} ngx_mail_smtp_ext_peer_t;


#define ngx_mail_smtp_ext_peer_state(peer)                                   \
    ((peer)->shared ? (peer)->shared : &(peer)->local)


typedef struct {
    ngx_str_t                       name;
    ngx_array_t                     peers;      /* ngx_mail_smtp_ext_peer_t */
    ngx_uint_t                      backups;
    unsigned                        least_conn:1;
    unsigned                        implicit:1; /* from smtp_ext_pass h:p */
    u_char                         *file_name;
    ngx_uint_t                      line;

    /* zone NAME [SIZE] */
    ngx_shm_zone_t                 *shm_zone;
    ngx_slab_pool_t                *shpool;
    ngx_uint_t                      generation; /* of the zone's state */

    /* health_check */
    ngx_msec_t                      hc_interval;    /* 0: no checks */
    ngx_msec_t                      hc_timeout;
    ngx_msec_t                      hc_jitter;
    ngx_uint_t                      hc_fails;
    ngx_uint_t                      hc_passes;
    ngx_str_t                       hc_ehlo;
    unsigned                        hc_mandatory:1;
    void                           *hc;             /* per worker */

    /* keepalive N [timeout=T]: idle connections cached per worker */
    ngx_uint_t                      keepalive;
    ngx_msec_t                      keepalive_timeout;
    ngx_queue_t                     cache;
    ngx_uint_t                      cached;
} ngx_mail_smtp_ext_pool_t;


typedef struct {
    ngx_array_t                     pools;      /* ngx_mail_smtp_ext_pool_t * */
    ngx_array_t                     redis;      /* Redis servers, by pointer */
    ngx_array_t                     redis_sentinels;
    void                           *cache;      /* smtp_ext_redis_cache */
} ngx_mail_smtp_ext_main_conf_t;


typedef struct {
    ngx_str_t                       pass_name;
    ngx_mail_smtp_ext_pool_t       *pass;

    ngx_uint_t                      auth_methods;
    ngx_flag_t                      require_auth;
    off_t                           max_message_size;
    ngx_uint_t                      max_recipients;
    ngx_flag_t                      xclient;
    ngx_flag_t                      proxy_protocol;
    ngx_uint_t                      upstream_tls;
    ngx_msec_t                      connect_timeout;
    ngx_msec_t                      upstream_timeout;
    ngx_uint_t                      bare_lf;
    ngx_uint_t                      auth_fail_limit;
    time_t                          auth_fail_window;
    ngx_uint_t                      min_data_rate;
    ngx_flag_t                      dsn;

    ngx_mail_smtp_ext_redis_conf_t *redis;
    ngx_thread_pool_t              *thread_pool;

#if (NGX_MAIL_SSL)
    ngx_ssl_t                      *upstream_ssl;
#endif

    /* replies built once at configuration time */
    ngx_str_t                       greeting;
    ngx_str_t                       helo;
    ngx_str_t                       ehlo;           /* in TLS or no TLS */
    ngx_str_t                       ehlo_starttls;  /* STARTTLS offered */
    ngx_str_t                       too_many_errors;
    ngx_str_t                       timed_out;
    size_t                          out_size;      /* reply buffer */
    size_t                          max_reply;     /* longest own reply */

    u_char                         *file_name;
    ngx_uint_t                      line;

#if (NGX_MAIL_SSL)
    /* smtp_ext_upstream_tls_* (ngx_mail_smtp_ext_upstream_tls.c) */
    ngx_flag_t                      upstream_tls_verify;
    ngx_uint_t                      upstream_tls_verify_depth;
    ngx_str_t                       upstream_tls_trusted_certificate;
    ngx_str_t                       upstream_tls_name;
    ngx_flag_t                      upstream_tls_server_name;
    ngx_str_t                       upstream_tls_certificate;
    ngx_str_t                       upstream_tls_certificate_key;
    ngx_uint_t                      upstream_tls_protocols;
    ngx_str_t                       upstream_tls_ciphers;
    ngx_flag_t                      upstream_tls_session_reuse;
#endif

    /* edge protection, SPEC §10 (ngx_mail_smtp_ext_edge.h) */
    ngx_array_t                    *limit_exempt;     /* ngx_cidr_t */
    ngx_uint_t                      limit_conn;
    ngx_shm_zone_t                 *limit_zone;
    ngx_array_t                    *ratelimits;       /* ..._ratelimit_t */
    ngx_msec_t                      greeting_delay;
    ngx_array_t                    *dnsbl;            /* ..._dnsbl_t */
    ngx_uint_t                      dnsbl_threshold;

    ngx_flag_t                      chunking;   /* smtp_ext_chunking */
} ngx_mail_smtp_ext_srv_conf_t;


typedef struct ngx_mail_smtp_ext_relay_s  ngx_mail_smtp_ext_relay_t;


/* what the session waits for */
typedef enum {
    ngx_smtp_ext_cmd = 0,       /* reading and executing commands */
    ngx_smtp_ext_wait,          /* a backend step or lookup is pending */
    ngx_smtp_ext_auth_line,     /* an AUTH continuation line is due */
    ngx_smtp_ext_data,          /* streaming the message */
    ngx_smtp_ext_starttls,      /* 220 queued, handshake next */
    ngx_smtp_ext_closing        /* reply queued, close after it */
} ngx_mail_smtp_ext_state_e;


typedef struct {
    ngx_mail_session_t             *session;
    ngx_mail_smtp_ext_state_e       state;

    ngx_buf_t                      *out;        /* replies to the client */
    ngx_buf_t                      *cmdbuf;     /* s->buffer between DATAs */
    ngx_buf_t                       dbuf;       /* s->buffer in DATA */
    ngx_buf_t                       out_buf;
    ngx_buf_t                       cmd_buf;
    ngx_buf_t                       big_out;    /* heap, for long replies */

    /* DATA: its deadline grows with the octets received */
    ngx_msec_t                      data_start;
    off_t                           data_in;
    ngx_msec_t                      wait_start;

    u_char                         *helo;
    size_t                          helo_len;
    size_t                          helo_size;

    /* transaction, its strings live in tpool */
    ngx_pool_t                     *tpool;
    ngx_str_t                       from;       /* path */
    ngx_str_t                       mail_cmd;   /* line for the backend */
    off_t                           size;       /* SIZE= or -1 */
    ngx_uint_t                      rcpts;      /* accepted */
    ngx_uint_t                      rcpts_tried;
    ngx_mail_smtp_ext_pool_t       *route;
    ngx_msec_t                      start;
    ngx_uint_t                      last_code;
    ngx_smtp_data_t                 data;
    ngx_uint_t                      step;       /* backend step awaited */
    ngx_str_t                      *pending_rcpt;
    ngx_str_t                       rcpt;       /* in rcpt_buf */
    ngx_str_t                       rcpt_dsn;   /* in rcpt_buf */
    u_char                         *rcpt_buf;   /* in tpool */
    ngx_str_t                       mail_dsn;   /* " RET=.. ENVID=.." */
    off_t                           skip;       /* octets of a refused
                                                   BDAT still to drop */
    ngx_mail_smtp_ext_pool_t       *pending_route;

    ngx_mail_smtp_ext_relay_t      *relay;

    /* AUTH and Redis lookups */
    ngx_uint_t                      auth_state;
    ngx_str_t                       user_route;

    unsigned                        greeted:1;  /* HELO or EHLO seen */
    unsigned                        in_tx:1;    /* MAIL accepted */
    unsigned                        smtputf8:1;
    unsigned                        utf8_env:1; /* a non-ASCII address */
    unsigned                        rcpt_utf8:1;
    unsigned                        body8:1;
    unsigned                        skip_line:1; /* overlong line */
    unsigned                        out_blocked:1;
    unsigned                        data_failed:1;
    unsigned                        quit:1;
    unsigned                        auth_cram:1;
    unsigned                        auth_cached:1;   /* user: from the cache */
    unsigned                        auth_disabled:1;

    /*
     * auth.c and route.c: per-exchange and per-lookup pools, so that a
     * session does not grow with its AUTH attempts and RCPT lookups.
     * s->login is set only once a password was verified; the candidate
     * user name of an exchange lives in auth_user, never in s->login.
     */
    ngx_pool_t                     *auth_pool;    /* AUTH exchange, or NULL */
    ngx_str_t                       auth_user;    /* candidate, in auth_pool */
    ngx_str_t                       auth_passwd;  /* in auth_pool */
    ngx_str_t                       auth_route;   /* candidate user_route */
    ngx_str_t                       auth_key;     /* user:LOGIN, auth_pool */
    ngx_str_t                       auth_stored;  /* its password field */
    ngx_pool_t                     *route_pool;   /* RCPT lookup, or NULL */
    ngx_str_t                       route_keys[2]; /* in route_pool */
    ngx_uint_t                      route_nkeys;
    void                           *route_holds[NGX_MAIL_SMTP_EXT_HOLDS];
    ngx_uint_t                      route_nholds; /* run-time routes held */
    unsigned                        lookup_cleanup:1; /* c->pool hook set */

    /* BDAT (ngx_mail_smtp_ext_body.c) */
    ngx_smtp_bdat_t                 bdat;       /* size, bare, too_big */
    off_t                           chunk;      /* the chunk's size */
    off_t                           chunk_left; /* its octets still due */
    ngx_str_t                       bdat_reply; /* DATA refused, in tpool */
    unsigned                        bdat_tx:1;  /* BDAT in this transaction */
    unsigned                        in_chunk:1; /* reading a chunk */
    unsigned                        chunk_last:1;   /* the client's LAST */
    unsigned                        bdat_relay:1;   /* backend takes BDAT */
    unsigned                        bdat_final:1;   /* LAST or dot sent */

    void                           *metrics;    /* metrics.c, or NULL */
    void                           *edge;   /* SPEC §10 edge protection */
} ngx_mail_smtp_ext_ctx_t;


/* the relay tells the session about a finished step */
typedef void (*ngx_mail_smtp_ext_relay_done_pt)(ngx_mail_session_t *s,
    ngx_int_t rc, ngx_uint_t code, u_char *reply, size_t len);


/* ngx_mail_smtp_ext_session.c */
void ngx_mail_smtp_ext_init_session(ngx_mail_session_t *s,
    ngx_connection_t *c);
void ngx_mail_smtp_ext_greet(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_init_protocol(ngx_event_t *rev);
void ngx_mail_smtp_ext_auth_state(ngx_event_t *rev);
ngx_int_t ngx_mail_smtp_ext_parse_command(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_relay_done(ngx_mail_session_t *s, ngx_int_t rc,
    ngx_uint_t code, u_char *reply, size_t len);
ngx_int_t ngx_mail_smtp_ext_reply(ngx_mail_session_t *s, ngx_str_t *reply);
ngx_str_t *ngx_mail_smtp_ext_not_ready(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_wait_lookup(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_lookup_done(ngx_mail_session_t *s, ngx_str_t *reply);
void ngx_mail_smtp_ext_rcpt_routed(ngx_mail_session_t *s);
/* for ngx_mail_smtp_ext_body.c */
void ngx_mail_smtp_ext_wait(ngx_mail_session_t *s, ngx_uint_t step);
void ngx_mail_smtp_ext_out_backend(ngx_mail_session_t *s, u_char *reply,
    size_t len);
ngx_int_t ngx_mail_smtp_ext_flush(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_end_tx(ngx_mail_session_t *s);
extern ngx_str_t  ngx_mail_smtp_ext_lost_reply;
extern ngx_str_t  ngx_mail_smtp_ext_error_reply;

/*
 * ngx_mail_smtp_ext_body.c: message data, DATA and BDAT (RFC 3030).  Its
 * backend steps, beside those session.c numbers from 1.
 */
#define NGX_MAIL_SMTP_EXT_STEP_DATA     3   /* the reply to DATA */
#define NGX_MAIL_SMTP_EXT_STEP_DOT      4   /* the reply to the dot */
#define NGX_MAIL_SMTP_EXT_STEP_BODY     6   /* a blocked body write */
#define NGX_MAIL_SMTP_EXT_STEP_BDAT     16  /* DATA for BDAT: its 354 */
#define NGX_MAIL_SMTP_EXT_STEP_CHUNK    17  /* the reply to a chunk */
#define NGX_MAIL_SMTP_EXT_STEP_BDAT_BODY 18 /* a blocked chunk write */

ngx_int_t ngx_mail_smtp_ext_data_body(ngx_mail_session_t *s);
ngx_int_t ngx_mail_smtp_ext_data_step_done(ngx_mail_session_t *s,
    ngx_uint_t step, ngx_int_t rc, ngx_uint_t code, u_char *reply,
    size_t len);
ngx_int_t ngx_mail_smtp_ext_data_failed(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_data_done(ngx_mail_session_t *s);
ngx_int_t ngx_mail_smtp_ext_data_buffer(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_data_buffer_release(ngx_mail_session_t *s);
ngx_int_t ngx_mail_smtp_ext_bdat(ngx_mail_session_t *s, ngx_smtp_cmd_t *cmd);
ngx_int_t ngx_mail_smtp_ext_bdat_body(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_bdat_done(ngx_mail_session_t *s, ngx_uint_t step,
    ngx_int_t rc, ngx_uint_t code, u_char *reply, size_t len);

/* ngx_mail_smtp_ext_auth.c */
ngx_int_t ngx_mail_smtp_ext_auth(ngx_mail_session_t *s, ngx_smtp_cmd_t *cmd);
ngx_int_t ngx_mail_smtp_ext_auth_line(ngx_mail_session_t *s, u_char *line,
    size_t len);
/*
 * Forgets any authentication and any pending AUTH exchange (STARTTLS, an
 * abandoned AUTH line).  A verified login also closes the relay, whose
 * XCLIENT carried it: call it only while no backend step is pending.
 */
void ngx_mail_smtp_ext_auth_reset(ngx_mail_session_t *s);
/* destroys the lookup pools and route holds when c->pool goes */
ngx_int_t ngx_mail_smtp_ext_lookup_cleanup_add(ngx_mail_session_t *s);

/* ngx_mail_smtp_ext_resolve.c */
ngx_int_t ngx_mail_smtp_ext_resolve(ngx_mail_session_t *s);

/* ngx_mail_smtp_ext_route.c */
ngx_int_t ngx_mail_smtp_ext_route(ngx_mail_session_t *s, ngx_str_t *rcpt);
void ngx_mail_smtp_ext_route_release(ngx_mail_session_t *s);

/* ngx_mail_smtp_ext_upstream.c */
char *ngx_mail_smtp_ext_upstream_block(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_mail_smtp_ext_pool_t *ngx_mail_smtp_ext_find_pool(ngx_conf_t *cf,
    ngx_mail_smtp_ext_main_conf_t *smcf, ngx_str_t *target);
ngx_mail_smtp_ext_peer_t *ngx_mail_smtp_ext_get_peer(
    ngx_mail_smtp_ext_pool_t *pool, ngx_uint_t tried, ngx_uint_t *busy);
void ngx_mail_smtp_ext_peer_done(ngx_mail_smtp_ext_pool_t *pool,
    ngx_mail_smtp_ext_peer_t *peer, ngx_uint_t failed);
void ngx_mail_smtp_ext_peer_ready(ngx_mail_smtp_ext_pool_t *pool,
    ngx_mail_smtp_ext_peer_t *peer);
void ngx_mail_smtp_ext_pool_lock(ngx_mail_smtp_ext_pool_t *pool);
void ngx_mail_smtp_ext_pool_unlock(ngx_mail_smtp_ext_pool_t *pool);
void ngx_mail_smtp_ext_pool_init_peer(ngx_mail_smtp_ext_peer_t *peer);
void ngx_mail_smtp_ext_upstream_init_process(
    ngx_mail_smtp_ext_main_conf_t *smcf);
ngx_uint_t ngx_mail_smtp_ext_peer_index(ngx_mail_smtp_ext_pool_t *pool,
    ngx_mail_smtp_ext_peer_t *peer);

/* ngx_mail_smtp_ext_health.c */
ngx_int_t ngx_mail_smtp_ext_health_init_process(ngx_cycle_t *cycle,
    ngx_mail_smtp_ext_main_conf_t *smcf);

/*
 * ngx_mail_smtp_ext_relay.c: the backend connection of a session.  Each
 * call that starts a step (open, rcpt, data, a body write that returned
 * NGX_AGAIN) ends in exactly one ngx_mail_smtp_ext_relay_done() call,
 * never from inside the call that started it.
 */
ngx_int_t ngx_mail_smtp_ext_relay_open(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_pool_t *pool);
void ngx_mail_smtp_ext_relay_rcpt(ngx_mail_session_t *s, ngx_str_t *rcpt);
void ngx_mail_smtp_ext_relay_data(ngx_mail_session_t *s);
ngx_buf_t *ngx_mail_smtp_ext_relay_body_buf(ngx_mail_session_t *s);
ngx_int_t ngx_mail_smtp_ext_relay_body(ngx_mail_session_t *s,
    ngx_uint_t last);
ngx_int_t ngx_mail_smtp_ext_relay_body_span(ngx_mail_session_t *s,
    u_char *p, size_t len);
ngx_uint_t ngx_mail_smtp_ext_relay_span_pending(ngx_mail_session_t *s);
ngx_uint_t ngx_mail_smtp_ext_relay_caps(ngx_mail_session_t *s);
/* a BDAT header for a backend that lists CHUNKING; the chunk follows */
ngx_int_t ngx_mail_smtp_ext_relay_bdat(ngx_mail_session_t *s, off_t size,
    ngx_uint_t last);
ngx_uint_t ngx_mail_smtp_ext_relay_early_reply(ngx_mail_session_t *s,
    u_char **p, size_t *len);
void ngx_mail_smtp_ext_relay_reset(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_relay_close(ngx_mail_session_t *s, ngx_uint_t quit);
void ngx_mail_smtp_ext_relay_release(ngx_mail_session_t *s);
ngx_uint_t ngx_mail_smtp_ext_relay_usable(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_pool_t *pool);
ngx_str_t *ngx_mail_smtp_ext_relay_peer_name(ngx_mail_session_t *s);

#if (NGX_MAIL_SSL)
/* ngx_mail_smtp_ext_upstream_tls.c: TLS towards the backends */
extern ngx_conf_bitmask_t  ngx_mail_smtp_ext_upstream_tls_protocols[];
char *ngx_mail_smtp_ext_upstream_tls_conf(ngx_conf_t *cf,
    ngx_mail_smtp_ext_srv_conf_t *conf);
ngx_int_t ngx_mail_smtp_ext_upstream_tls_init(ngx_mail_session_t *s,
    ngx_connection_t *c, ngx_mail_smtp_ext_peer_t *peer);
/* after the handshake: NULL, or why the backend must not be used */
char *ngx_mail_smtp_ext_upstream_tls_check(ngx_mail_session_t *s,
    ngx_connection_t *c);
#endif


extern ngx_module_t  ngx_mail_smtp_ext_module;


#endif /* _NGX_MAIL_SMTP_EXT_MODULE_H_INCLUDED_ */
