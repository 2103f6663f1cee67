
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * SPEC 9: metrics and the transaction log line.
 *
 * Counters live in one shared memory zone, "smtp_ext_metrics", added
 * with the same name, size and tag by the mail module and by the http
 * status module, so that either may come first and the counters are
 * kept whenever the mail module is configured.  nginx hands the old
 * zone to the init callback at reload: the counters go on.  Every
 * update is an atomic addition.
 *
 * Per listen address a slot holds its counters; slots are found by the
 * address text (as nginx prints the listen address), so a reload keeps
 * a listen's series.  The connections_active gauge is kept per worker
 * (a slot claimed by pid at start) and summed at scrape time over the
 * workers that are alive: a crashed worker's count cannot stay behind.
 * Peer series are read from the pools' own zones (upstream.c).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>
#include <nginx.h>

#include "ngx_mail_smtp_ext_module.h"
#include "ngx_mail_smtp_ext_metrics.h"
#include "ngx_mail_smtp_ext_version.h"


/*
 * For the benchmark only (docs/performance.md): a build with
 * -DNGX_SMTP_EXT_BENCH_NO_COUNTERS=1 updates no counter, so that one run
 * can show what counting costs.
 */

#if (NGX_SMTP_EXT_BENCH_NO_COUNTERS)
#undef ngx_atomic_fetch_add
#define ngx_atomic_fetch_add(value, add)  ((void) (value), (void) (add), 0)
#endif


#define NGX_SMTP_EXT_M_SIZE       (256 * 1024)
#define NGX_SMTP_EXT_M_LISTENS    64
#define NGX_SMTP_EXT_M_NAME       128
#define NGX_SMTP_EXT_M_WORKERS    128
#define NGX_SMTP_EXT_M_BUCKETS    11
#define NGX_SMTP_EXT_M_TO         10
#define NGX_SMTP_EXT_M_NONE       ((ngx_uint_t) -1)


/* counters of a listen slot */
enum {
    ngx_m_conn = 0,
    ngx_m_rejected,                         /* 4 reasons */
    ngx_m_msg = ngx_m_rejected + 4,         /* accepted rejected temp abrt */
    ngx_m_bytes = ngx_m_msg + 4,
    ngx_m_rcpt,                             /* accepted rejected tempfailed */
    ngx_m_auth = ngx_m_rcpt + 3,            /* 3 mechanisms x 3 results */
    ngx_m_tls = ngx_m_auth + 9,             /* ok failed */
    ngx_m_bucket = ngx_m_tls + 2,           /* 11 buckets, then over 10s */
    ngx_m_relay_count = ngx_m_bucket + NGX_SMTP_EXT_M_BUCKETS + 1,
    ngx_m_relay_sum_us,
    ngx_m_listen_n
};

#define NGX_SMTP_EXT_M_MSG_ACCEPTED    0
#define NGX_SMTP_EXT_M_MSG_REJECTED    1
#define NGX_SMTP_EXT_M_MSG_TEMPFAILED  2
#define NGX_SMTP_EXT_M_MSG_ABORTED     3


typedef struct {
    ngx_atomic_t                    pid;
    ngx_atomic_t                    active[NGX_SMTP_EXT_M_LISTENS];
} ngx_smtp_ext_m_worker_t;


typedef struct {
    size_t                          name_len[NGX_SMTP_EXT_M_LISTENS];
    u_char                          name[NGX_SMTP_EXT_M_LISTENS]
                                        [NGX_SMTP_EXT_M_NAME];
    ngx_atomic_t                    listen[NGX_SMTP_EXT_M_LISTENS]
                                          [ngx_m_listen_n];
    ngx_atomic_t                    redis[3];
    ngx_atomic_t                    cache[3];
    ngx_atomic_t                    ratelimit[3][5][3];
    ngx_smtp_ext_m_worker_t         worker[NGX_SMTP_EXT_M_WORKERS];
} ngx_smtp_ext_m_shm_t;


typedef struct {
    ngx_str_t                       name;
    ngx_uint_t                      slot;
} ngx_smtp_ext_m_listen_t;


/* per cycle: what the configuration names, and the zone */
typedef struct {
    ngx_shm_zone_t                 *zone;
    ngx_smtp_ext_m_shm_t           *sh;
    ngx_array_t                     listens;    /* ngx_smtp_ext_m_listen_t */
    ngx_mail_smtp_ext_main_conf_t  *smcf;       /* pools, or NULL */
    ngx_mail_protocol_t            *protocol;
} ngx_smtp_ext_m_conf_t;


/* per client connection, in c->pool */
typedef struct {
    ngx_uint_t                      listen;
    ngx_atomic_t                   *active;
    unsigned                        tls:1;      /* a handshake is due */
    unsigned                        rcpt:1;     /* an RCPT awaits its reply */
    unsigned                        data:1;     /* 354 sent */
    unsigned                        data_end:1; /* end of data answered */
    unsigned                        mech:2;     /* AUTH mechanism, 1..3 */
    ngx_msec_t                      dot;        /* the client's end of data */
    ngx_uint_t                      last_reply;
    ngx_uint_t                      nto;
    ngx_str_t                       to[NGX_SMTP_EXT_M_TO];
} ngx_smtp_ext_m_conn_t;


static ngx_int_t ngx_smtp_ext_m_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static void ngx_smtp_ext_m_accept(ngx_connection_t *c);
static ngx_mail_addr_conf_t *ngx_smtp_ext_m_addr_conf(ngx_connection_t *c);
static void ngx_smtp_ext_m_conn_cleanup(void *data);
static ngx_smtp_ext_m_conn_t *ngx_smtp_ext_m_conn(ngx_mail_session_t *s);
static ngx_uint_t ngx_smtp_ext_m_alive(ngx_pid_t pid);


static ngx_str_t  ngx_smtp_ext_m_zone_name = ngx_string(NGX_SMTP_EXT_M_ZONE);

/* this worker's view: set in init_process */
static ngx_smtp_ext_m_conf_t    *ngx_smtp_ext_m;
static ngx_smtp_ext_m_worker_t  *ngx_smtp_ext_m_worker;

static ngx_msec_t  ngx_smtp_ext_m_le[NGX_SMTP_EXT_M_BUCKETS] = {
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000
};

static char  *ngx_smtp_ext_m_le_text[NGX_SMTP_EXT_M_BUCKETS] = {
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5",
    "5", "10"
};

static char  *ngx_smtp_ext_m_reasons[] = {
    "limit_conn", "ratelimit", "pregreet", "dnsbl"
};

static char  *ngx_smtp_ext_m_msg_results[] = {
    "accepted", "rejected", "tempfailed", "aborted"
};

static char  *ngx_smtp_ext_m_rcpt_results[] = {
    "accepted", "rejected", "tempfailed"
};

static char  *ngx_smtp_ext_m_mechs[] = { "plain", "login", "cram-md5" };

static char  *ngx_smtp_ext_m_auth_results[] = {
    "success", "failure", "tempfail"
};

static char  *ngx_smtp_ext_m_events[] = { "connect", "mail", "rcpt" };

static char  *ngx_smtp_ext_m_keys[] = {
    "ip", "user", "sender", "sender_domain", "rcpt_domain"
};

static char  *ngx_smtp_ext_m_actions[] = { "allow", "reject", "error" };


extern ngx_module_t  ngx_mail_module;


/* --- configuration ---------------------------------------------------- */

ngx_shm_zone_t *
ngx_mail_smtp_ext_metrics_zone(ngx_conf_t *cf)
{
    ngx_shm_zone_t         *zone;
    ngx_smtp_ext_m_conf_t  *mcf;

    zone = ngx_shared_memory_add(cf, &ngx_smtp_ext_m_zone_name,
                                 NGX_SMTP_EXT_M_SIZE,
                                 &ngx_mail_smtp_ext_module);
    if (zone == NULL) {
        return NULL;
    }

    if (zone->data) {
        return zone;
    }

    mcf = ngx_pcalloc(cf->pool, sizeof(ngx_smtp_ext_m_conf_t));
    if (mcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&mcf->listens, cf->pool, 4,
                       sizeof(ngx_smtp_ext_m_listen_t))
        != NGX_OK)
    {
        return NULL;
    }

    mcf->zone = zone;

    zone->init = ngx_smtp_ext_m_init_zone;
    zone->data = mcf;

    return zone;
}


/* mail{}: the zone, and the listen addresses of smtp_ext servers */

ngx_int_t
ngx_mail_smtp_ext_metrics_conf(ngx_conf_t *cf, void *smcf,
    ngx_mail_protocol_t *protocol)
{
    u_char                     *p;
    size_t                      len;
    ngx_uint_t                  i, j;
    ngx_shm_zone_t             *zone;
    ngx_mail_listen_t          *ls;
    ngx_smtp_ext_m_conf_t      *mcf;
    ngx_smtp_ext_m_listen_t    *ml;
    ngx_mail_core_srv_conf_t   *cscf;
    ngx_mail_core_main_conf_t  *cmcf;
    u_char                      text[NGX_SOCKADDR_STRLEN];

    zone = ngx_mail_smtp_ext_metrics_zone(cf);
    if (zone == NULL) {
        return NGX_ERROR;
    }

    mcf = zone->data;
    mcf->smcf = smcf;
    mcf->protocol = protocol;

    cmcf = ngx_mail_conf_get_module_main_conf(cf, ngx_mail_core_module);
    ls = cmcf->listen.elts;

    for (i = 0; i < cmcf->listen.nelts; i++) {

        cscf = ls[i].ctx->srv_conf[ngx_mail_core_module.ctx_index];

        if (cscf->protocol != protocol) {
            continue;
        }

        /* as ngx_mail_add_addrs() prints it: the sessions' s->addr_text */
        len = ngx_sock_ntop(ls[i].sockaddr, ls[i].socklen, text,
                            NGX_SOCKADDR_STRLEN, 1);

        ml = mcf->listens.elts;

        for (j = 0; j < mcf->listens.nelts; j++) {
            if (ml[j].name.len == len
                && ngx_strncmp(ml[j].name.data, text, len) == 0)
            {
                break;
            }
        }

        if (j < mcf->listens.nelts) {
            continue;
        }

        p = ngx_pnalloc(cf->pool, len);
        ml = ngx_array_push(&mcf->listens);

        if (p == NULL || ml == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(p, text, len);
        ml->name.data = p;
        ml->name.len = len;
        ml->slot = NGX_SMTP_EXT_M_NONE;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_smtp_ext_m_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_smtp_ext_m_conf_t  *omcf = data;

    size_t                    len;
    ngx_uint_t                i, k, free;
    ngx_slab_pool_t          *shpool;
    ngx_smtp_ext_m_shm_t     *sh;
    ngx_smtp_ext_m_conf_t    *mcf;
    ngx_smtp_ext_m_listen_t  *ml;

    mcf = shm_zone->data;
    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (omcf) {
        sh = omcf->sh;

    } else if (shm_zone->shm.exists) {
        sh = shpool->data;

    } else {
        sh = ngx_slab_calloc(shpool, sizeof(ngx_smtp_ext_m_shm_t));
        if (sh == NULL) {
            return NGX_ERROR;
        }

        shpool->data = sh;
    }

    mcf->sh = sh;

    /*
     * A listen keeps its slot across reloads; a new one takes a free
     * slot.  Old workers still count into the slots they know, so a slot
     * is never renamed while free ones are left.
     */

    ml = mcf->listens.elts;

    for (i = 0; i < mcf->listens.nelts; i++) {

        len = ngx_min(ml[i].name.len, NGX_SMTP_EXT_M_NAME);
        free = NGX_SMTP_EXT_M_NONE;

        for (k = 0; k < NGX_SMTP_EXT_M_LISTENS; k++) {

            if (sh->name_len[k] == len
                && ngx_strncmp(sh->name[k], ml[i].name.data, len) == 0)
            {
                break;
            }

            if (sh->name_len[k] == 0 && free == NGX_SMTP_EXT_M_NONE) {
                free = k;
            }
        }

        if (k == NGX_SMTP_EXT_M_LISTENS) {

            if (free == NGX_SMTP_EXT_M_NONE) {
                ngx_log_error(NGX_LOG_WARN, shm_zone->shm.log, 0,
                              "smtp_ext: no metrics for listen %V: more "
                              "than %d listen addresses since start",
                              &ml[i].name, NGX_SMTP_EXT_M_LISTENS);
                continue;
            }

            k = free;
            ngx_memcpy(sh->name[k], ml[i].name.data, len);
            sh->name_len[k] = len;
        }

        ml[i].slot = k;
    }

    return NGX_OK;
}


/* --- processes ------------------------------------------------------- */

ngx_int_t
ngx_mail_smtp_ext_metrics_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                i;
    ngx_pid_t                 pid;
    ngx_list_part_t          *part;
    ngx_listening_t          *ls;
    ngx_shm_zone_t           *zone;
    ngx_smtp_ext_m_shm_t     *sh;
    ngx_smtp_ext_m_worker_t  *w;

    ngx_smtp_ext_m = NULL;
    ngx_smtp_ext_m_worker = NULL;

    part = &cycle->shared_memory.part;
    zone = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NGX_OK;
            }

            part = part->next;
            zone = part->elts;
            i = 0;
        }

        if (zone[i].tag == &ngx_mail_smtp_ext_module
            && zone[i].shm.name.len == ngx_smtp_ext_m_zone_name.len
            && ngx_strncmp(zone[i].shm.name.data,
                           ngx_smtp_ext_m_zone_name.data,
                           ngx_smtp_ext_m_zone_name.len) == 0)
        {
            break;
        }
    }

    ngx_smtp_ext_m = zone[i].data;
    sh = ngx_smtp_ext_m->sh;

    if (sh == NULL) {
        ngx_smtp_ext_m = NULL;
        return NGX_OK;
    }

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    /* a slot for this worker's gauges: free, or left by a dead process */

    for (i = 0; i < NGX_SMTP_EXT_M_WORKERS; i++) {
        w = &sh->worker[i];
        pid = (ngx_pid_t) w->pid;

        if (pid != 0 && ngx_smtp_ext_m_alive(pid)) {
            continue;
        }

        if (ngx_atomic_cmp_set(&w->pid, (ngx_atomic_uint_t) pid, ngx_pid)) {
            ngx_memzero((void *) w->active, sizeof(w->active));
            ngx_smtp_ext_m_worker = w;
            break;
        }
    }

    /* count every connection when it is accepted, before any TLS */

    ls = cycle->listening.elts;

    for (i = 0; i < cycle->listening.nelts; i++) {
        if (ls[i].handler == ngx_mail_init_connection) {
            ls[i].handler = ngx_smtp_ext_m_accept;
        }
    }

    return NGX_OK;
}


void
ngx_mail_smtp_ext_metrics_exit_process(ngx_cycle_t *cycle)
{
    if (ngx_smtp_ext_m_worker) {
        ngx_memzero((void *) ngx_smtp_ext_m_worker->active,
                    sizeof(ngx_smtp_ext_m_worker->active));
        (void) ngx_atomic_cmp_set(&ngx_smtp_ext_m_worker->pid,
                                  (ngx_atomic_uint_t) ngx_pid, 0);
        ngx_smtp_ext_m_worker = NULL;
    }
}


static ngx_uint_t
ngx_smtp_ext_m_alive(ngx_pid_t pid)
{
    if (pid == ngx_pid) {
        return 1;
    }

    /* EPERM: it exists; workers run as one user, so rarely seen */
    return kill(pid, 0) == 0 || ngx_errno != NGX_ESRCH;
}


/* --- connections -------------------------------------------------------- */

static void
ngx_smtp_ext_m_accept(ngx_connection_t *c)
{
    ngx_uint_t                 i;
    ngx_pool_cleanup_t        *cln;
    ngx_mail_addr_conf_t      *addr_conf;
    ngx_smtp_ext_m_conn_t     *mc;
    ngx_smtp_ext_m_listen_t   *ml;
    ngx_mail_core_srv_conf_t  *cscf;

    if (ngx_smtp_ext_m == NULL) {
        goto done;
    }

    addr_conf = ngx_smtp_ext_m_addr_conf(c);
    if (addr_conf == NULL) {
        goto done;
    }

    cscf = addr_conf->ctx->srv_conf[ngx_mail_core_module.ctx_index];

    if (cscf->protocol != ngx_smtp_ext_m->protocol) {
        goto done;
    }

    ml = ngx_smtp_ext_m->listens.elts;

    for (i = 0; i < ngx_smtp_ext_m->listens.nelts; i++) {
        if (ml[i].name.len == addr_conf->addr_text.len
            && ngx_strncmp(ml[i].name.data, addr_conf->addr_text.data,
                           ml[i].name.len) == 0)
        {
            break;
        }
    }

    if (i == ngx_smtp_ext_m->listens.nelts
        || ml[i].slot == NGX_SMTP_EXT_M_NONE)
    {
        goto done;
    }

    mc = ngx_pcalloc(c->pool, sizeof(ngx_smtp_ext_m_conn_t));
    cln = ngx_pool_cleanup_add(c->pool, 0);

    if (mc == NULL || cln == NULL) {
        goto done;
    }

    mc->listen = ml[i].slot;
    mc->tls = addr_conf->ssl;

    (void) ngx_atomic_fetch_add(
                        &ngx_smtp_ext_m->sh->listen[mc->listen][ngx_m_conn], 1);

    if (ngx_smtp_ext_m_worker) {
        mc->active = &ngx_smtp_ext_m_worker->active[mc->listen];
        (void) ngx_atomic_fetch_add(mc->active, 1);
    }

    cln->handler = ngx_smtp_ext_m_conn_cleanup;
    cln->data = mc;

done:

    ngx_mail_init_connection(c);
}


/* the address conf that ngx_mail_init_connection() will find */

static ngx_mail_addr_conf_t *
ngx_smtp_ext_m_addr_conf(ngx_connection_t *c)
{
    ngx_uint_t            i;
    ngx_mail_port_t      *port;
    struct sockaddr_in   *sin;
    ngx_mail_in_addr_t   *addr;
#if (NGX_HAVE_INET6)
    struct sockaddr_in6  *sin6;
    ngx_mail_in6_addr_t  *addr6;
#endif

    port = c->listening->servers;

    if (port->naddrs > 1) {

        if (ngx_connection_local_sockaddr(c, NULL, 0) != NGX_OK) {
            return NULL;
        }

        switch (c->local_sockaddr->sa_family) {

#if (NGX_HAVE_INET6)
        case AF_INET6:
            sin6 = (struct sockaddr_in6 *) c->local_sockaddr;
            addr6 = port->addrs;

            for (i = 0; i < port->naddrs - 1; i++) {
                if (ngx_memcmp(&addr6[i].addr6, &sin6->sin6_addr, 16) == 0) {
                    break;
                }
            }

            return &addr6[i].conf;
#endif

        default:
            sin = (struct sockaddr_in *) c->local_sockaddr;
            addr = port->addrs;

            for (i = 0; i < port->naddrs - 1; i++) {
                if (addr[i].addr == sin->sin_addr.s_addr) {
                    break;
                }
            }

            return &addr[i].conf;
        }
    }

    switch (c->local_sockaddr->sa_family) {

#if (NGX_HAVE_INET6)
    case AF_INET6:
        addr6 = port->addrs;
        return &addr6[0].conf;
#endif

    default:
        addr = port->addrs;
        return &addr[0].conf;
    }
}


static void
ngx_smtp_ext_m_conn_cleanup(void *data)
{
    ngx_smtp_ext_m_conn_t  *mc = data;

    if (mc->tls && ngx_smtp_ext_m) {
        /* "listen ... ssl" or STARTTLS: no session came out of it */
        (void) ngx_atomic_fetch_add(
                      &ngx_smtp_ext_m->sh->listen[mc->listen][ngx_m_tls + 1],
                      1);
    }

    if (mc->active) {
        (void) ngx_atomic_fetch_add(mc->active, (ngx_atomic_int_t) -1);
    }
}


static ngx_smtp_ext_m_conn_t *
ngx_smtp_ext_m_conn(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    return ctx ? ctx->metrics : NULL;
}


#define ngx_smtp_ext_m_inc(mc, i)                                            \
    (void) ngx_atomic_fetch_add(                                             \
                          &ngx_smtp_ext_m->sh->listen[(mc)->listen][i], 1)


/* a session starts: after accept, a "listen ... ssl" handshake, STARTTLS */

void
ngx_mail_smtp_ext_metric_session(ngx_mail_session_t *s)
{
    ngx_connection_t         *c;
    ngx_pool_cleanup_t       *cln;
    ngx_smtp_ext_m_conn_t    *mc;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    mc = ctx->metrics;

    if (mc == NULL) {
        for (cln = c->pool->cleanup; cln; cln = cln->next) {
            if (cln->handler == ngx_smtp_ext_m_conn_cleanup) {
                mc = cln->data;
                ctx->metrics = mc;
                break;
            }
        }

        if (mc == NULL) {
            return;
        }
    }

    if (mc->tls && c->ssl) {
        mc->tls = 0;
        ngx_smtp_ext_m_inc(mc, ngx_m_tls);
    }
}


void
ngx_mail_smtp_ext_metric_starttls(ngx_mail_session_t *s)
{
    ngx_smtp_ext_m_conn_t  *mc;

    mc = ngx_smtp_ext_m_conn(s);

    if (mc) {
        mc->tls = 1;
    }
}


void
ngx_mail_smtp_ext_metric_reject(ngx_mail_session_t *s, ngx_uint_t reason)
{
    ngx_smtp_ext_m_conn_t  *mc;

    mc = ngx_smtp_ext_m_conn(s);

    if (mc && reason < 4) {
        ngx_smtp_ext_m_inc(mc, ngx_m_rejected + reason);
    }
}


/* --- commands and replies ------------------------------------------------ */

/*
 * Every client line at debug level, AUTH secrets as "***"; and the AUTH
 * mechanism for the auth counters.
 */

void
ngx_mail_smtp_ext_metric_line(ngx_mail_session_t *s, u_char *line,
    size_t len)
{
    u_char                   *p, *last;
    ngx_smtp_ext_m_conn_t    *mc;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    mc = ctx->metrics;

    while (len && (line[len - 1] == LF || line[len - 1] == CR)) {
        len--;
    }

    if (ctx->state == ngx_smtp_ext_auth_line) {
        ngx_log_debug0(NGX_LOG_DEBUG_MAIL, s->connection->log, 0,
                       "smtp_ext: client: ***");
        return;
    }

    if (len > 5 && ngx_strncasecmp(line, (u_char *) "AUTH ", 5) == 0) {

        last = line + len;

        for (p = line + 5; p < last && *p == ' '; p++) { /* void */ }

        if (mc) {
            mc->mech = 0;

            if (last - p >= 5 && ngx_strncasecmp(p, (u_char *) "PLAIN", 5)
                                 == 0)
            {
                mc->mech = 1;

            } else if (last - p >= 5
                       && ngx_strncasecmp(p, (u_char *) "LOGIN", 5) == 0)
            {
                mc->mech = 2;

            } else if (last - p >= 8
                       && ngx_strncasecmp(p, (u_char *) "CRAM-MD5", 8) == 0)
            {
                mc->mech = 3;
            }
        }

        /* the mechanism stays visible, an initial response does not */

        while (p < last && *p != ' ') {
            p++;
        }

        if (p < last) {
            ngx_log_debug2(NGX_LOG_DEBUG_MAIL, s->connection->log, 0,
                           "smtp_ext: client: %*s ***",
                           (size_t) (p - line), line);
            return;
        }
    }

    ngx_log_debug2(NGX_LOG_DEBUG_MAIL, s->connection->log, 0,
                   "smtp_ext: client: %*s", len, line);
}


void
ngx_mail_smtp_ext_metric_rcpt(ngx_mail_session_t *s)
{
    ngx_smtp_ext_m_conn_t  *mc;

    mc = ngx_smtp_ext_m_conn(s);

    if (mc) {
        mc->rcpt = 1;
    }
}


/* every reply queued for the client, ours or a backend's */

void
ngx_mail_smtp_ext_metric_reply(ngx_mail_session_t *s, u_char *reply,
    size_t len)
{
    u_char                   *p;
    ngx_str_t                *to;
    ngx_uint_t                code;
    ngx_smtp_ext_m_conn_t    *mc;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ngx_log_debug2(NGX_LOG_DEBUG_MAIL, s->connection->log, 0,
                   "smtp_ext: reply: %*s",
                   len > 2 ? len - 2 : len, reply);

    if (len < 3 || reply[0] < '1' || reply[0] > '5'
        || reply[1] < '0' || reply[1] > '9'
        || reply[2] < '0' || reply[2] > '9')
    {
        return;
    }

    code = (reply[0] - '0') * 100 + (reply[1] - '0') * 10 + reply[2] - '0';

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    mc = ctx->metrics;

    if (mc == NULL) {
        return;
    }

    if (ctx->in_tx) {
        mc->last_reply = code;
    }

    if (!mc->rcpt || ngx_smtp_ext_m == NULL) {
        return;
    }

    /* the reply to an RCPT: counted once, by class */

    mc->rcpt = 0;

    switch (code / 100) {

    case 2:
        ngx_smtp_ext_m_inc(mc, ngx_m_rcpt);

        if (!ctx->in_tx || mc->nto >= NGX_SMTP_EXT_M_TO
            || ctx->tpool == NULL)
        {
            break;
        }

        p = ngx_pnalloc(ctx->tpool, ctx->rcpt.len);
        if (p == NULL) {
            break;
        }

        to = &mc->to[mc->nto++];
        to->data = p;
        to->len = ctx->rcpt.len;
        ngx_memcpy(p, ctx->rcpt.data, ctx->rcpt.len);
        break;

    case 4:
        ngx_smtp_ext_m_inc(mc, ngx_m_rcpt + 2);
        break;

    default:
        ngx_smtp_ext_m_inc(mc, ngx_m_rcpt + 1);
        break;
    }
}


void
ngx_mail_smtp_ext_metric_auth(ngx_mail_session_t *s, ngx_int_t rc)
{
    ngx_uint_t              result;
    ngx_smtp_ext_m_conn_t  *mc;

    mc = ngx_smtp_ext_m_conn(s);

    if (mc == NULL || mc->mech == 0 || ngx_smtp_ext_m == NULL) {
        return;
    }

    result = (rc == NGX_OK) ? 0 : (rc == NGX_DECLINED) ? 1 : 2;

    ngx_smtp_ext_m_inc(mc, ngx_m_auth + (mc->mech - 1) * 3 + result);
}


/* --- messages -------------------------------------------------------- */

/* the 354 went out: the message is under way */

void
ngx_mail_smtp_ext_metric_data(ngx_mail_session_t *s)
{
    ngx_smtp_ext_m_conn_t  *mc;

    mc = ngx_smtp_ext_m_conn(s);

    if (mc) {
        mc->data = 1;
        mc->data_end = 0;
    }
}


/* the client's end of data */

void
ngx_mail_smtp_ext_metric_dot(ngx_mail_session_t *s)
{
    ngx_smtp_ext_m_conn_t  *mc;

    mc = ngx_smtp_ext_m_conn(s);

    if (mc) {
        mc->dot = ngx_current_msec;
    }
}


/* the backend's final reply to the end of data */

void
ngx_mail_smtp_ext_metric_relayed(ngx_mail_session_t *s)
{
    ngx_uint_t              i;
    ngx_msec_int_t          ms;
    ngx_smtp_ext_m_conn_t  *mc;

    mc = ngx_smtp_ext_m_conn(s);

    if (mc == NULL || ngx_smtp_ext_m == NULL) {
        return;
    }

    ms = (ngx_msec_int_t) (ngx_current_msec - mc->dot);
    if (ms < 0) {
        ms = 0;
    }

    for (i = 0; i < NGX_SMTP_EXT_M_BUCKETS; i++) {
        if ((ngx_msec_t) ms <= ngx_smtp_ext_m_le[i]) {
            break;
        }
    }

    ngx_smtp_ext_m_inc(mc, ngx_m_bucket + i);
    ngx_smtp_ext_m_inc(mc, ngx_m_relay_count);
    (void) ngx_atomic_fetch_add(
               &ngx_smtp_ext_m->sh->listen[mc->listen][ngx_m_relay_sum_us],
               (ngx_atomic_int_t) ms * 1000);
}


/* the end of data was answered: ctx->last_code is that reply */

void
ngx_mail_smtp_ext_metric_data_end(ngx_mail_session_t *s)
{
    off_t                     size;
    ngx_uint_t                result;
    ngx_smtp_ext_m_conn_t    *mc;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    mc = ctx->metrics;

    if (mc == NULL || !mc->data) {
        return;
    }

    mc->data_end = 1;

    if (ngx_smtp_ext_m == NULL) {
        return;
    }

    switch (ctx->last_code / 100) {

    case 2:
        result = NGX_SMTP_EXT_M_MSG_ACCEPTED;

        /* as the backend reads it: without the stuffed dots */
        size = ctx->data.size - ctx->data.dots;

        (void) ngx_atomic_fetch_add(
                    &ngx_smtp_ext_m->sh->listen[mc->listen][ngx_m_bytes],
                    (ngx_atomic_int_t) size);
        break;

    case 4:
        result = NGX_SMTP_EXT_M_MSG_TEMPFAILED;
        break;

    default:
        result = NGX_SMTP_EXT_M_MSG_REJECTED;
        break;
    }

    ngx_smtp_ext_m_inc(mc, ngx_m_msg + result);
}


/*
 * SPEC 7 and 9: one line per transaction, however it ended.  Called
 * once per transaction, before its pool goes.
 */

void
ngx_mail_smtp_ext_tx_log(ngx_mail_session_t *s)
{
    u_char                   *p, *last;
    char                     *status;
    ngx_str_t                *backend, none, helo, *route;
    ngx_uint_t                i, reply, data, data_end, nto;
    ngx_msec_int_t            ms;
    ngx_connection_t         *c;
    ngx_smtp_ext_m_conn_t    *mc;
    ngx_mail_smtp_ext_ctx_t  *ctx;
    u_char                    to[NGX_MAX_ERROR_STR / 2];

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    mc = ctx->metrics;

    ngx_str_set(&none, "-");

    backend = ngx_mail_smtp_ext_relay_peer_name(s);
    if (backend == NULL) {
        backend = &none;
    }

    route = ctx->route ? &ctx->route->name
                       : ctx->pending_route ? &ctx->pending_route->name
                                            : &none;

    helo.data = ctx->helo;
    helo.len = ctx->helo_len;

    ms = (ngx_msec_int_t) (ngx_current_msec - ctx->start);
    if (ms < 0) {
        ms = 0;
    }

    data = mc ? mc->data : 0;
    data_end = mc ? mc->data_end : 0;
    reply = mc ? mc->last_reply : ctx->last_code;
    nto = mc ? mc->nto : 0;

    if (data_end) {
        reply = ctx->last_code;
    }

    if (data && !data_end && mc && ngx_smtp_ext_m) {
        /* the client left or timed out in DATA */
        ngx_smtp_ext_m_inc(mc, ngx_m_msg + NGX_SMTP_EXT_M_MSG_ABORTED);
    }

    if (data_end) {
        status = (reply / 100 == 2) ? "sent"
                 : (reply / 100 == 4) ? "deferred" : "rejected";

    } else if (ctx->last_code == 0 || ctx->rcpts) {
        /* disconnect or timeout; RSET, QUIT, HELO after recipients */
        status = "aborted";

    } else if (reply / 100 == 5) {
        status = "rejected";

    } else if (reply / 100 == 4) {
        status = "deferred";

    } else {
        status = "aborted";
    }

    p = to;
    last = to + sizeof(to);

    for (i = 0; i < nto; i++) {
        p = ngx_slprintf(p, last, "%s<%V>", i ? "," : "", &mc->to[i]);
    }

    if (ctx->rcpts > nto) {
        p = ngx_slprintf(p, last, "%s+%ui", nto ? "," : "",
                         ctx->rcpts - nto);
    }

    ngx_log_error(NGX_LOG_INFO, c->log, 0,
                  "smtp_ext: client=%V helo=\"%V\" login=\"%V\" from=<%V> "
                  "rcpts=%ui to=%*s route=%V backend=%V size=%O "
                  "status=%s reply=%ui duration=%T.%03Ms",
                  &c->addr_text, &helo, s->login.len ? &s->login : &none,
                  &ctx->from, ctx->rcpts, p - to, to, route, backend,
                  ctx->data.size - ctx->data.dots, status, reply,
                  (time_t) ms / 1000, ms % 1000);

    if (mc) {
        mc->data = 0;
        mc->data_end = 0;
        mc->rcpt = 0;
        mc->nto = 0;
        mc->last_reply = 0;
    }
}


/* --- process-wide counters -------------------------------------------- */

void
ngx_mail_smtp_ext_metric_redis(ngx_uint_t result)
{
    if (ngx_smtp_ext_m && result < 3) {
        (void) ngx_atomic_fetch_add(&ngx_smtp_ext_m->sh->redis[result], 1);
    }
}


void
ngx_mail_smtp_ext_metric_cache(ngx_uint_t result)
{
    if (ngx_smtp_ext_m && result < 3) {
        (void) ngx_atomic_fetch_add(&ngx_smtp_ext_m->sh->cache[result], 1);
    }
}


void
ngx_mail_smtp_ext_metric_ratelimit(ngx_uint_t event, ngx_uint_t key,
    ngx_uint_t action)
{
    if (ngx_smtp_ext_m && event < 3 && key < 5 && action < 3) {
        (void) ngx_atomic_fetch_add(
                         &ngx_smtp_ext_m->sh->ratelimit[event][key][action], 1);
    }
}


/* --- the Prometheus text format ------------------------------------------ */

typedef struct {
    ngx_pool_t     *pool;
    ngx_chain_t    *first;
    ngx_chain_t   **last;
    ngx_buf_t      *b;
    off_t           len;
    ngx_uint_t      error;
} ngx_smtp_ext_m_out_t;


#define NGX_SMTP_EXT_M_CHUNK  16384
#define NGX_SMTP_EXT_M_LINE   1024


static u_char *
ngx_smtp_ext_m_room(ngx_smtp_ext_m_out_t *o)
{
    ngx_chain_t  *cl;

    if (o->error) {
        return NULL;
    }

    if (o->b && o->b->end - o->b->last >= NGX_SMTP_EXT_M_LINE) {
        return o->b->last;
    }

    o->b = ngx_create_temp_buf(o->pool, NGX_SMTP_EXT_M_CHUNK);
    cl = ngx_alloc_chain_link(o->pool);

    if (o->b == NULL || cl == NULL) {
        o->error = 1;
        return NULL;
    }

    cl->buf = o->b;
    cl->next = NULL;
    *o->last = cl;
    o->last = &cl->next;

    return o->b->last;
}


static void
ngx_smtp_ext_m_printf(ngx_smtp_ext_m_out_t *o, const char *fmt, ...)
{
    u_char   *p, *q;
    va_list   args;

    p = ngx_smtp_ext_m_room(o);
    if (p == NULL) {
        return;
    }

    va_start(args, fmt);
    q = ngx_vslprintf(p, p + NGX_SMTP_EXT_M_LINE, fmt, args);
    va_end(args);

    o->b->last = q;
    o->len += q - p;
}


/* a label value: backslash, double quote and newline escaped */

static u_char *
ngx_smtp_ext_m_escape(ngx_pool_t *pool, ngx_str_t *v, size_t max)
{
    u_char  *d, *p, *s, *last;

    p = ngx_pnalloc(pool, 2 * ngx_min(v->len, max) + 1);
    if (p == NULL) {
        return (u_char *) "";
    }

    d = p;
    last = v->data + ngx_min(v->len, max);

    for (s = v->data; s < last; s++) {
        if (*s == '\\' || *s == '"') {
            *d++ = '\\';
            *d++ = *s;

        } else if (*s == '\n') {
            *d++ = '\\';
            *d++ = 'n';

        } else {
            *d++ = *s;
        }
    }

    *d = '\0';

    return p;
}


static void
ngx_smtp_ext_m_family(ngx_smtp_ext_m_out_t *o, char *name, char *type,
    char *help)
{
    ngx_smtp_ext_m_printf(o, "# HELP %s %s\n# TYPE %s %s\n",
                          name, help, name, type);
}


ngx_int_t
ngx_mail_smtp_ext_metrics_render(ngx_shm_zone_t *zone, ngx_pool_t *pool,
    ngx_chain_t **out, off_t *len)
{
    u_char                          **lname, *uname, *pname;
    ngx_uint_t                        i, j, k, n, w, nl, up;
    ngx_pid_t                         pid;
    ngx_atomic_t                     *cnt;
    ngx_atomic_uint_t                 v, cum;
    ngx_smtp_ext_m_out_t              o;
    ngx_smtp_ext_m_shm_t             *sh;
    ngx_smtp_ext_m_conf_t            *mcf;
    ngx_smtp_ext_m_listen_t          *ml;
    ngx_mail_smtp_ext_peer_t         *peer;
    ngx_mail_smtp_ext_pool_t        **pools, *ep;
    ngx_mail_smtp_ext_peer_state_t   *st;

    mcf = zone->data;
    sh = mcf->sh;

    if (sh == NULL) {
        return NGX_ERROR;
    }

    ngx_memzero(&o, sizeof(ngx_smtp_ext_m_out_t));
    o.pool = pool;
    o.last = &o.first;

    ml = mcf->listens.elts;
    nl = mcf->listens.nelts;

    lname = ngx_pcalloc(pool, (nl + 1) * sizeof(u_char *));
    if (lname == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < nl; i++) {
        lname[i] = ngx_smtp_ext_m_escape(pool, &ml[i].name,
                                         NGX_SMTP_EXT_M_NAME);
    }

#define ngx_m_val(i, c)  (sh->listen[ml[i].slot][c])

#define ngx_m_listens(i)                                                     \
    for (i = 0; i < nl; i++)                                                 \
        if (ml[i].slot != NGX_SMTP_EXT_M_NONE)

    ngx_smtp_ext_m_family(&o, "smtp_ext_connections_total", "counter",
                          "Client connections accepted.");
    ngx_m_listens(i) {
        ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_connections_total{listen=\"%s\"} "
                              "%uA\n", lname[i], ngx_m_val(i, ngx_m_conn));
    }

    ngx_smtp_ext_m_family(&o, "smtp_ext_connections_active", "gauge",
                          "Client connections open now.");
    ngx_m_listens(i) {
        v = 0;

        for (w = 0; w < NGX_SMTP_EXT_M_WORKERS; w++) {
            pid = (ngx_pid_t) sh->worker[w].pid;

            if (pid && ngx_smtp_ext_m_alive(pid)) {
                v += sh->worker[w].active[ml[i].slot];
            }
        }

        /* a decrement seen before its increment: never below zero */
        if ((ngx_atomic_int_t) v < 0) {
            v = 0;
        }

        ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_connections_active{listen=\"%s\"} "
                              "%uA\n", lname[i], v);
    }

    ngx_smtp_ext_m_family(&o, "smtp_ext_connections_rejected_total",
                          "counter", "Client connections refused by edge "
                          "protection.");
    ngx_m_listens(i) {
        for (k = 0; k < 4; k++) {
            ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_connections_rejected_total"
                              "{listen=\"%s\",reason=\"%s\"} %uA\n",
                              lname[i], ngx_smtp_ext_m_reasons[k],
                              ngx_m_val(i, ngx_m_rejected + k));
        }
    }

    ngx_smtp_ext_m_family(&o, "smtp_ext_messages_total", "counter",
                          "Messages by the reply to their end of data.");
    ngx_m_listens(i) {
        for (k = 0; k < 4; k++) {
            ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_messages_total"
                              "{listen=\"%s\",result=\"%s\"} %uA\n",
                              lname[i], ngx_smtp_ext_m_msg_results[k],
                              ngx_m_val(i, ngx_m_msg + k));
        }
    }

    ngx_smtp_ext_m_family(&o, "smtp_ext_message_bytes_total", "counter",
                          "Octets of accepted messages, dot-unstuffed.");
    ngx_m_listens(i) {
        ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_message_bytes_total{listen=\"%s\"} "
                              "%uA\n", lname[i], ngx_m_val(i, ngx_m_bytes));
    }

    ngx_smtp_ext_m_family(&o, "smtp_ext_recipients_total", "counter",
                          "RCPT replies by class.");
    ngx_m_listens(i) {
        for (k = 0; k < 3; k++) {
            ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_recipients_total"
                              "{listen=\"%s\",result=\"%s\"} %uA\n",
                              lname[i], ngx_smtp_ext_m_rcpt_results[k],
                              ngx_m_val(i, ngx_m_rcpt + k));
        }
    }

    ngx_smtp_ext_m_family(&o, "smtp_ext_auth_total", "counter",
                          "AUTH exchanges by mechanism and result.");
    ngx_m_listens(i) {
        for (k = 0; k < 3; k++) {
            for (j = 0; j < 3; j++) {
                ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_auth_total{listen=\"%s\","
                              "mechanism=\"%s\",result=\"%s\"} %uA\n",
                              lname[i], ngx_smtp_ext_m_mechs[k],
                              ngx_smtp_ext_m_auth_results[j],
                              ngx_m_val(i, ngx_m_auth + k * 3 + j));
            }
        }
    }

    ngx_smtp_ext_m_family(&o, "smtp_ext_tls_handshakes_total", "counter",
                          "Client TLS handshakes (STARTTLS and listen ssl).");
    ngx_m_listens(i) {
        ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_tls_handshakes_total"
                              "{listen=\"%s\",result=\"ok\"} %uA\n"
                              "smtp_ext_tls_handshakes_total"
                              "{listen=\"%s\",result=\"failed\"} %uA\n",
                              lname[i], ngx_m_val(i, ngx_m_tls),
                              lname[i], ngx_m_val(i, ngx_m_tls + 1));
    }

    ngx_smtp_ext_m_family(&o, "smtp_ext_relay_duration_seconds",
                          "histogram", "From the client's end of data to "
                          "the backend's final reply.");
    ngx_m_listens(i) {
        cum = 0;

        for (k = 0; k < NGX_SMTP_EXT_M_BUCKETS; k++) {
            cum += ngx_m_val(i, ngx_m_bucket + k);
            ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_relay_duration_seconds_bucket"
                              "{listen=\"%s\",le=\"%s\"} %uA\n",
                              lname[i], ngx_smtp_ext_m_le_text[k], cum);
        }

        /* +Inf from the buckets themselves: it equals _count */
        cum += ngx_m_val(i, ngx_m_bucket + NGX_SMTP_EXT_M_BUCKETS);
        v = ngx_m_val(i, ngx_m_relay_sum_us);

        ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_relay_duration_seconds_bucket"
                              "{listen=\"%s\",le=\"+Inf\"} %uA\n"
                              "smtp_ext_relay_duration_seconds_sum"
                              "{listen=\"%s\"} %uA.%06uA\n"
                              "smtp_ext_relay_duration_seconds_count"
                              "{listen=\"%s\"} %uA\n",
                              lname[i], cum, lname[i], v / 1000000,
                              v % 1000000, lname[i], cum);
    }

    /* peers: read from the pools' zones, as upstream.c keeps them */

    n = 0;
    pools = NULL;

    if (mcf->smcf) {
        pools = mcf->smcf->pools.elts;
        n = mcf->smcf->pools.nelts;
    }

    for (k = 0; k < 5; k++) {

        switch (k) {
        case 0:
            ngx_smtp_ext_m_family(&o, "smtp_ext_upstream_peer_up", "gauge",
                                  "1 when the peer may get connections.");
            break;
        case 1:
            ngx_smtp_ext_m_family(&o,
                                  "smtp_ext_upstream_peer_connections_active",
                                  "gauge", "Backend connections open now, "
                                  "idle cached ones included.");
            break;
        case 2:
            ngx_smtp_ext_m_family(&o, "smtp_ext_upstream_peer_selected_total",
                                  "counter", "Backend connections opened.");
            break;
        case 3:
            ngx_smtp_ext_m_family(&o, "smtp_ext_upstream_peer_failures_total",
                                  "counter", "Failed attempts.");
            break;
        case 4:
            ngx_smtp_ext_m_family(&o,
                                  "smtp_ext_upstream_peer_health_checks_total",
                                  "counter", "Active health checks by "
                                  "result.");
            break;
        default:
            continue;
        }

        for (up = 0; up < n; up++) {
            ep = pools[up];

            if (ep->shm_zone == NULL) {
                continue;
            }

            uname = ngx_smtp_ext_m_escape(pool, &ep->name, 256);
            peer = ep->peers.elts;

            for (j = 0; j < ep->peers.nelts; j++) {

                if (peer[j].shared == NULL) {
                    continue;
                }

                st = peer[j].shared;
                pname = ngx_smtp_ext_m_escape(pool, &peer[j].server, 256);

                switch (k) {

                case 0:
                    v = !(peer[j].down || st->unhealthy
                          || (peer[j].max_fails
                              && st->fails >= peer[j].max_fails
                              && ngx_time() - st->checked
                                 <= peer[j].fail_timeout));
                    ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_upstream_peer_up{upstream=\"%s\","
                              "peer=\"%s\"} %uA\n", uname, pname, v);
                    break;

                case 1:
                    ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_upstream_peer_connections_active"
                              "{upstream=\"%s\",peer=\"%s\"} %ui\n",
                              uname, pname, st->conns);
                    break;

                case 2:
                    ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_upstream_peer_selected_total"
                              "{upstream=\"%s\",peer=\"%s\"} %uA\n",
                              uname, pname, st->selected);
                    break;

                case 3:
                    ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_upstream_peer_failures_total"
                              "{upstream=\"%s\",peer=\"%s\"} %uA\n",
                              uname, pname, st->failures);
                    break;

                default:
                    ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_upstream_peer_health_checks_total"
                              "{upstream=\"%s\",peer=\"%s\",result=\"ok\"} "
                              "%uA\n"
                              "smtp_ext_upstream_peer_health_checks_total"
                              "{upstream=\"%s\",peer=\"%s\","
                              "result=\"failed\"} %uA\n",
                              uname, pname, st->hc_ok,
                              uname, pname, st->hc_failed);
                    break;
                }
            }
        }
    }

    ngx_smtp_ext_m_family(&o, "smtp_ext_redis_requests_total", "counter",
                          "Redis requests by outcome.");
    ngx_smtp_ext_m_printf(&o,
                          "smtp_ext_redis_requests_total{result=\"ok\"} %uA\n"
                          "smtp_ext_redis_requests_total{result=\"error\"} "
                          "%uA\n"
                          "smtp_ext_redis_requests_total"
                          "{result=\"timeout\"} %uA\n",
                          sh->redis[0], sh->redis[1], sh->redis[2]);

    ngx_smtp_ext_m_family(&o, "smtp_ext_redis_cache_total", "counter",
                          "Redis lookups answered by the local cache.");
    ngx_smtp_ext_m_printf(&o,
                          "smtp_ext_redis_cache_total{result=\"hit\"} %uA\n"
                          "smtp_ext_redis_cache_total{result=\"miss\"} %uA\n"
                          "smtp_ext_redis_cache_total{result=\"stale\"} "
                          "%uA\n",
                          sh->cache[0], sh->cache[1], sh->cache[2]);

    ngx_smtp_ext_m_family(&o, "smtp_ext_ratelimit_total", "counter",
                          "Rate limit checks by event, key and action.");

    for (i = 0; i < 3; i++) {
        for (j = 0; j < 5; j++) {
            cnt = sh->ratelimit[i][j];

            if (cnt[0] == 0 && cnt[1] == 0 && cnt[2] == 0) {
                continue;
            }

            for (k = 0; k < 3; k++) {
                ngx_smtp_ext_m_printf(&o,
                              "smtp_ext_ratelimit_total{event=\"%s\","
                              "key=\"%s\",action=\"%s\"} %uA\n",
                              ngx_smtp_ext_m_events[i],
                              ngx_smtp_ext_m_keys[j],
                              ngx_smtp_ext_m_actions[k], cnt[k]);
            }
        }
    }

    ngx_smtp_ext_m_family(&o, "smtp_ext_build_info", "gauge",
                          "The module's and nginx's versions.");
    ngx_smtp_ext_m_printf(&o,
                          "smtp_ext_build_info"
                          "{version=\"%s\",nginx=\"%s\"} 1\n",
                          NGX_MAIL_SMTP_EXT_VERSION, NGINX_VERSION);

#undef ngx_m_val
#undef ngx_m_listens

    if (o.error || o.first == NULL) {
        return NGX_ERROR;
    }

    o.b->last_buf = 1;
    o.b->last_in_chain = 1;

    *out = o.first;
    *len = o.len;

    return NGX_OK;
}
