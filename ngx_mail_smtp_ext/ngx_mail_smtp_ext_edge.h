
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * Edge protection (SPEC §10): smtp_ext_limit_exempt, smtp_ext_limit_conn
 * (ngx_mail_smtp_ext_limit.c), smtp_ext_ratelimit
 * (ngx_mail_smtp_ext_ratelimit.c), smtp_ext_greeting_delay and
 * smtp_ext_dnsbl (ngx_mail_smtp_ext_dnsbl.c).
 */


#ifndef _NGX_MAIL_SMTP_EXT_EDGE_H_INCLUDED_
#define _NGX_MAIL_SMTP_EXT_EDGE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>


#define NGX_MAIL_SMTP_EXT_RL_CONNECT        0
#define NGX_MAIL_SMTP_EXT_RL_MAIL           1
#define NGX_MAIL_SMTP_EXT_RL_RCPT           2

#define NGX_MAIL_SMTP_EXT_RL_IP             0
#define NGX_MAIL_SMTP_EXT_RL_USER           1
#define NGX_MAIL_SMTP_EXT_RL_SENDER         2
#define NGX_MAIL_SMTP_EXT_RL_SENDER_DOMAIN  3
#define NGX_MAIL_SMTP_EXT_RL_RCPT_DOMAIN    4

/* the most rules one event may have: one script call checks them all */
#define NGX_MAIL_SMTP_EXT_RL_MAX            16


/* smtp_ext_ratelimit EVENT KEY RATE [burst=N] [dry_run] */
typedef struct {
    ngx_uint_t                      event;
    ngx_uint_t                      key;
    ngx_uint_t                      rate;       /* N per period */
    time_t                          period;     /* seconds */
    ngx_uint_t                      burst;
    uint64_t                        interval;   /* microseconds */
    ngx_str_t                       kind;       /* "ratelimit:EVENT:KEY:" */
    unsigned                        dry_run:1;
} ngx_mail_smtp_ext_ratelimit_t;


/* smtp_ext_dnsbl ZONE[=A.B.C.D[,...]][*WEIGHT] */
typedef struct {
    ngx_str_t                       zone;
    ngx_array_t                    *answers;    /* in_addr_t, or NULL */
    ngx_uint_t                      weight;
} ngx_mail_smtp_ext_dnsbl_t;


/* a session's edge state, ctx->edge; in c->pool */
typedef struct {
    ngx_mail_session_t             *session;

    /* limit_conn: the slot held, released by a c->pool cleanup */
    ngx_shm_zone_t                 *limit_zone;
    void                           *limit_node;

    /* ratelimit: the check under way */
    ngx_uint_t                      rl_event;
    ngx_uint_t                      rl_n;
    ngx_mail_smtp_ext_ratelimit_t  *rl_rules[NGX_MAIL_SMTP_EXT_RL_MAX];
    ngx_str_t                       rl_values[NGX_MAIL_SMTP_EXT_RL_MAX];
    const char                    **rl_argv;    /* for NOSCRIPT: resent */
    size_t                         *rl_argvlen;
    int                             rl_argc;
    ngx_pool_t                     *rl_pool;

    /* DNSBL and greeting delay */
    ngx_resolver_ctx_t            **dnsbl_ctx;
    ngx_uint_t                     *dnsbl_weight; /* counted, per zone */
    ngx_uint_t                      dnsbl_pending;
    ngx_event_t                     delay;

    unsigned                        exempt:1;
    unsigned                        holding:1;      /* greeting held */
    unsigned                        greet_wanted:1; /* greet() came */
    unsigned                        delaying:1;
    unsigned                        rcpt_passed:1;
    unsigned                        rl_noscript:1;
    unsigned                        dnsbl_starting:1;
    unsigned                        done:1;         /* refused or closed */
} ngx_mail_smtp_ext_edge_t;


/* the directives (command table in ngx_mail_smtp_ext_module.c) */
char *ngx_mail_smtp_ext_limit_exempt(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_mail_smtp_ext_limit_conn(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_mail_smtp_ext_ratelimit(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_mail_smtp_ext_dnsbl(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

/* ngx_mail_smtp_ext_limit.c: configuration, and the session's start */
void ngx_mail_smtp_ext_edge_create_conf(void *conf);
char *ngx_mail_smtp_ext_edge_merge_conf(ngx_conf_t *cf, void *parent,
    void *child);

/*
 * At the session's start, before the greeting.  NGX_OK: go on (the
 * greeting may be held: ngx_mail_smtp_ext_edge_hold()); NGX_DONE: the
 * session was refused or closed.
 */
ngx_int_t ngx_mail_smtp_ext_edge_start(ngx_mail_session_t *s);
/* in ngx_mail_smtp_ext_greet(): 1 while the edge checks hold it back */
ngx_uint_t ngx_mail_smtp_ext_edge_hold(ngx_mail_session_t *s);

ngx_mail_smtp_ext_edge_t *ngx_mail_smtp_ext_edge_get(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_edge_refuse(ngx_mail_session_t *s, ngx_str_t *reply,
    const char *reason);
void ngx_mail_smtp_ext_edge_next(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_edge_release(ngx_mail_session_t *s);
ngx_uint_t ngx_mail_smtp_ext_edge_ip_key(ngx_mail_session_t *s, u_char *buf,
    size_t *len);

/* ngx_mail_smtp_ext_ratelimit.c */
/*
 * NGX_DECLINED: no rule applies, or the check already passed (go on);
 * NGX_AGAIN: the check is under way, its end calls
 * ngx_mail_smtp_ext_edge_next() (connect), ngx_mail_smtp_ext_mail_limited()
 * (mail) or ngx_mail_smtp_ext_rcpt_routed() / lookup_done() (rcpt).
 */
ngx_int_t ngx_mail_smtp_ext_ratelimit_check(ngx_mail_session_t *s,
    ngx_uint_t event);

/* ngx_mail_smtp_ext_dnsbl.c: DNSBL lookups and the greeting delay */
char *ngx_mail_smtp_ext_dnsbl_merge(ngx_conf_t *cf, void *conf);
ngx_int_t ngx_mail_smtp_ext_dnsbl_start(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_pregreet_handler(ngx_event_t *rev);

/* ngx_mail_smtp_ext_session.c: the session's side of the hooks */
void ngx_mail_smtp_ext_refuse(ngx_mail_session_t *s, ngx_str_t *reply);
void ngx_mail_smtp_ext_mail_limited(ngx_mail_session_t *s, ngx_str_t *reply);


#endif /* _NGX_MAIL_SMTP_EXT_EDGE_H_INCLUDED_ */
