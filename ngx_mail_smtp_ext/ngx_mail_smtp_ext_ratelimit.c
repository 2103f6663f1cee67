
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * smtp_ext_ratelimit (SPEC §10): limits shared by every nginx node
 * through Redis.  Each key holds a GCRA "theoretical arrival time"; the
 * rules of one event are checked and counted by one Lua script call with
 * Redis server time, all or nothing: an event refused by one rule counts
 * against none.  The script is called by EVALSHA; after NOSCRIPT (a
 * restarted or flushed Redis) it is loaded with SCRIPT LOAD, pipelined
 * with the EVALSHA that is sent again.  Redis down, erroring or silent
 * for its timeout lets the event through.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>
#include <ngx_sha1.h>

#include "ngx_mail_smtp_ext_module.h"
#include "ngx_mail_smtp_ext_edge.h"


static ngx_int_t ngx_mail_smtp_ext_ratelimit_value(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_ratelimit_t *rl, ngx_pool_t *pool, ngx_str_t *value);
static void ngx_mail_smtp_ext_ratelimit_handler(void *data,
    redisReply **replies, ngx_uint_t n);
static ngx_uint_t ngx_mail_smtp_ext_ratelimit_result(ngx_mail_session_t *s,
    redisReply *r);
static void ngx_mail_smtp_ext_ratelimit_done(ngx_mail_session_t *s,
    ngx_uint_t refused);
static void ngx_mail_smtp_ext_ratelimit_sha(void);
static void ngx_mail_smtp_ext_rl_count_error(ngx_mail_smtp_ext_edge_t *edge);


static const char *ngx_mail_smtp_ext_rl_events[] = {
    "connect", "mail", "rcpt", NULL
};

static const char *ngx_mail_smtp_ext_rl_keys[] = {
    "ip", "user", "sender", "sender_domain", "rcpt_domain", NULL
};


/*
 * KEYS: one per rule; ARGV: per rule the emission interval (us), the
 * burst and 1 for dry_run.  Returns 1 (over) or 0 per rule, then 1 when
 * the event is refused.  Times are integer microseconds: exact in a Lua
 * number up to 2^53.
 */

static ngx_str_t  ngx_mail_smtp_ext_rl_script = ngx_string(
    "if redis.replicate_commands then redis.replicate_commands() end\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local res, tat, refuse = {}, {}, 0\n"
    "for i = 1, #KEYS do\n"
    "  local em = tonumber(ARGV[3 * i - 2])\n"
    "  local burst = tonumber(ARGV[3 * i - 1])\n"
    "  local v = tonumber(redis.call('GET', KEYS[i]) or '0') or 0\n"
    "  if v < now then v = now end\n"
    "  if v + em - burst * em > now then\n"
    "    res[i] = 1\n"
    "    if ARGV[3 * i] == '0' then refuse = 1 end\n"
    "  else\n"
    "    res[i] = 0\n"
    "    tat[i] = v + em\n"
    "  end\n"
    "end\n"
    "if refuse == 0 then\n"
    "  for i = 1, #KEYS do\n"
    "    if tat[i] then\n"
    "      redis.call('SET', KEYS[i], string.format('%.0f', tat[i]),\n"
    "                 'PX', math.ceil((tat[i] - now) / 1000))\n"
    "    end\n"
    "  end\n"
    "end\n"
    "res[#KEYS + 1] = refuse\n"
    "return res\n");

static u_char  ngx_mail_smtp_ext_rl_sha[40];


static ngx_str_t  ngx_mail_smtp_ext_rl_connect =
    ngx_string("421 4.7.0 Too many connections, slow down" CRLF);
static ngx_str_t  ngx_mail_smtp_ext_rl_mail =
    ngx_string("450 4.7.1 Too much mail, slow down" CRLF);
static ngx_str_t  ngx_mail_smtp_ext_rl_rcpt =
    ngx_string("450 4.7.1 Too many recipients, slow down" CRLF);


/* smtp_ext_ratelimit EVENT KEY RATE [burst=N] [dry_run] */

char *
ngx_mail_smtp_ext_ratelimit(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_mail_smtp_ext_srv_conf_t *sscf = conf;

    u_char                         *slash;
    ngx_int_t                       n;
    ngx_str_t                      *value;
    ngx_uint_t                      i, count;
    ngx_mail_smtp_ext_ratelimit_t  *rl, *rls;

    value = cf->args->elts;

    if (sscf->ratelimits == NULL) {
        sscf->ratelimits = ngx_array_create(cf->pool, 4,
                                        sizeof(ngx_mail_smtp_ext_ratelimit_t));
        if (sscf->ratelimits == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    rl = ngx_array_push(sscf->ratelimits);
    if (rl == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(rl, sizeof(ngx_mail_smtp_ext_ratelimit_t));

    for (i = 0; ngx_mail_smtp_ext_rl_events[i]; i++) {
        if (ngx_strcmp(value[1].data, ngx_mail_smtp_ext_rl_events[i]) == 0) {
            break;
        }
    }

    if (ngx_mail_smtp_ext_rl_events[i] == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid event \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    rl->event = i;

    for (i = 0; ngx_mail_smtp_ext_rl_keys[i]; i++) {
        if (ngx_strcmp(value[2].data, ngx_mail_smtp_ext_rl_keys[i]) == 0) {
            break;
        }
    }

    if (ngx_mail_smtp_ext_rl_keys[i] == NULL
        || (rl->event == NGX_MAIL_SMTP_EXT_RL_CONNECT
            && i != NGX_MAIL_SMTP_EXT_RL_IP)
        || (rl->event == NGX_MAIL_SMTP_EXT_RL_MAIL
            && i == NGX_MAIL_SMTP_EXT_RL_RCPT_DOMAIN))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid key \"%V\" for event \"%V\"",
                           &value[2], &value[1]);
        return NGX_CONF_ERROR;
    }

    rl->key = i;

    /* RATE: N/s, N/m, N/h or N/d */

    slash = ngx_strlchr(value[3].data, value[3].data + value[3].len, '/');

    n = NGX_ERROR;

    if (slash && slash + 2 == value[3].data + value[3].len) {
        n = ngx_atoi(value[3].data, slash - value[3].data);

        switch (slash[1]) {
        case 's':
            rl->period = 1;
            break;
        case 'm':
            rl->period = 60;
            break;
        case 'h':
            rl->period = 3600;
            break;
        case 'd':
            rl->period = 86400;
            break;
        default:
            n = NGX_ERROR;
        }
    }

    if (n == NGX_ERROR || n == 0
        || (uint64_t) rl->period * 1000000 / n == 0)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid rate \"%V\"", &value[3]);
        return NGX_CONF_ERROR;
    }

    rl->rate = n;
    rl->burst = n;
    rl->interval = (uint64_t) rl->period * 1000000 / n;

    for (i = 4; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "burst=", 6) == 0) {
            n = ngx_atoi(value[i].data + 6, value[i].len - 6);
            if (n == NGX_ERROR || n == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid burst \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            rl->burst = n;
            continue;
        }

        if (ngx_strcmp(value[i].data, "dry_run") == 0) {
            rl->dry_run = 1;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    /* "ratelimit:EVENT:KEY:", NUL-terminated for the key builder */

    rl->kind.len = sizeof("ratelimit:::") - 1 + value[1].len + value[2].len;
    rl->kind.data = ngx_pnalloc(cf->pool, rl->kind.len + 1);
    if (rl->kind.data == NULL) {
        return NGX_CONF_ERROR;
    }

    (void) ngx_sprintf(rl->kind.data, "ratelimit:%V:%V:%Z", &value[1],
                       &value[2]);

    count = 0;
    rls = sscf->ratelimits->elts;

    for (i = 0; i < sscf->ratelimits->nelts; i++) {
        if (rls[i].event == rl->event) {
            count++;
        }
    }

    if (count > NGX_MAIL_SMTP_EXT_RL_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "too many \"smtp_ext_ratelimit %V\" rules, "
                           "at most %d", &value[1],
                           NGX_MAIL_SMTP_EXT_RL_MAX);
        return NGX_CONF_ERROR;
    }

    ngx_mail_smtp_ext_ratelimit_sha();

    return NGX_CONF_OK;
}


static void
ngx_mail_smtp_ext_ratelimit_sha(void)
{
    u_char      hash[20];
    ngx_sha1_t  sha1;

    ngx_sha1_init(&sha1);
    ngx_sha1_update(&sha1, ngx_mail_smtp_ext_rl_script.data,
                    ngx_mail_smtp_ext_rl_script.len);
    ngx_sha1_final(hash, &sha1);

    ngx_hex_dump(ngx_mail_smtp_ext_rl_sha, hash, 20);
}


ngx_int_t
ngx_mail_smtp_ext_ratelimit_check(ngx_mail_session_t *s, ngx_uint_t event)
{
    u_char                         *p;
    ngx_str_t                       key;
    ngx_uint_t                      i, n;
    ngx_pool_t                     *pool;
    ngx_connection_t               *c;
    ngx_mail_smtp_ext_edge_t       *edge;
    ngx_mail_smtp_ext_ratelimit_t  *rl;
    ngx_mail_smtp_ext_srv_conf_t   *sscf;
    ngx_mail_smtp_ext_redis_cmd_t   cmd;

    c = s->connection;
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (sscf->ratelimits == NULL) {
        return NGX_DECLINED;
    }

    edge = ngx_mail_smtp_ext_edge_get(s);
    if (edge == NULL || edge->exempt) {
        return NGX_DECLINED;
    }

    if (event == NGX_MAIL_SMTP_EXT_RL_RCPT && edge->rcpt_passed) {
        /* the recipient's check is over, the session goes on */
        edge->rcpt_passed = 0;
        return NGX_DECLINED;
    }

    pool = NULL;
    rl = sscf->ratelimits->elts;
    n = 0;

    for (i = 0; i < sscf->ratelimits->nelts; i++) {

        if (rl[i].event != event
            || (rl[i].key == NGX_MAIL_SMTP_EXT_RL_USER && s->login.len == 0))
        {
            continue;
        }

        if (pool == NULL) {
            pool = ngx_create_pool(1024, c->log);
            if (pool == NULL) {
                return NGX_DECLINED;
            }
        }

        switch (ngx_mail_smtp_ext_ratelimit_value(s, &rl[i], pool,
                                                  &edge->rl_values[n]))
        {
        case NGX_OK:
            edge->rl_rules[n++] = &rl[i];
            break;

        case NGX_DECLINED:
            break;

        default:
            ngx_destroy_pool(pool);
            return NGX_DECLINED;
        }
    }

    if (n == 0) {
        if (pool) {
            ngx_destroy_pool(pool);
        }

        return NGX_DECLINED;
    }

    /* EVALSHA sha numkeys key... (interval burst dry_run)... */

    edge->rl_argc = 3 + 4 * n;
    edge->rl_argv = ngx_palloc(pool, edge->rl_argc * sizeof(char *));
    edge->rl_argvlen = ngx_palloc(pool, edge->rl_argc * sizeof(size_t));
    p = ngx_pnalloc(pool, NGX_INT_T_LEN + n * (2 * NGX_INT64_LEN + 4));

    if (edge->rl_argv == NULL || edge->rl_argvlen == NULL || p == NULL) {
        ngx_destroy_pool(pool);
        return NGX_DECLINED;
    }

    edge->rl_argv[0] = "EVALSHA";
    edge->rl_argvlen[0] = sizeof("EVALSHA") - 1;
    edge->rl_argv[1] = (const char *) ngx_mail_smtp_ext_rl_sha;
    edge->rl_argvlen[1] = 40;

    edge->rl_argv[2] = (const char *) p;
    p = ngx_sprintf(p, "%ui", n);
    edge->rl_argvlen[2] = p - (u_char *) edge->rl_argv[2];

    for (i = 0; i < n; i++) {
        rl = edge->rl_rules[i];

        if (ngx_mail_smtp_ext_redis_key(pool, sscf->redis,
                (const char *) rl->kind.data, &edge->rl_values[i],
                rl->key != NGX_MAIL_SMTP_EXT_RL_IP
                && rl->key != NGX_MAIL_SMTP_EXT_RL_USER, &key)
            != NGX_OK)
        {
            ngx_destroy_pool(pool);
            return NGX_DECLINED;
        }

        edge->rl_argv[3 + i] = (const char *) key.data;
        edge->rl_argvlen[3 + i] = key.len;

        edge->rl_argv[3 + n + 3 * i] = (const char *) p;
        p = ngx_sprintf(p, "%uL", rl->interval);
        edge->rl_argvlen[3 + n + 3 * i] =
                                p - (u_char *) edge->rl_argv[3 + n + 3 * i];

        edge->rl_argv[4 + n + 3 * i] = (const char *) p;
        p = ngx_sprintf(p, "%ui", rl->burst);
        edge->rl_argvlen[4 + n + 3 * i] =
                                p - (u_char *) edge->rl_argv[4 + n + 3 * i];

        edge->rl_argv[5 + n + 3 * i] = rl->dry_run ? "1" : "0";
        edge->rl_argvlen[5 + n + 3 * i] = 1;
    }

    edge->rl_pool = pool;
    edge->rl_n = n;
    edge->rl_event = event;
    edge->rl_noscript = 0;

    cmd.argc = edge->rl_argc;
    cmd.argv = edge->rl_argv;
    cmd.argvlen = edge->rl_argvlen;

    if (ngx_mail_smtp_ext_redis_query(sscf->redis, c->pool, &cmd, 1,
                                      ngx_mail_smtp_ext_ratelimit_handler, s)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_WARN, c->log, 0,
                      "smtp_ext: %s rate limit not checked, Redis is "
                      "unavailable: allowed",
                      ngx_mail_smtp_ext_rl_events[event]);

        ngx_mail_smtp_ext_rl_count_error(edge);
        edge->rl_pool = NULL;
        ngx_destroy_pool(pool);
        return NGX_DECLINED;
    }

    return NGX_AGAIN;
}


/* NGX_OK: the rule's value; NGX_DECLINED: the rule does not apply */

static ngx_int_t
ngx_mail_smtp_ext_ratelimit_value(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_ratelimit_t *rl, ngx_pool_t *pool, ngx_str_t *value)
{
    u_char                   *p, *at;
    size_t                    len;
    ngx_str_t                *addr;
    ngx_uint_t                family;
    ngx_mail_smtp_ext_ctx_t  *ctx;
    u_char                    ip[16];

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    switch (rl->key) {

    case NGX_MAIL_SMTP_EXT_RL_IP:
        ngx_memzero(ip, sizeof(ip));

        family = ngx_mail_smtp_ext_edge_ip_key(s, ip, &len);
        if (family == 0) {
            return NGX_DECLINED;
        }

        p = ngx_pnalloc(pool, NGX_INET6_ADDRSTRLEN + sizeof("/64"));
        if (p == NULL) {
            return NGX_ERROR;
        }

        value->data = p;

        if (family == AF_INET) {
            len = ngx_inet_ntop(AF_INET, ip, p, NGX_INET_ADDRSTRLEN);
            value->len = len;
            return NGX_OK;
        }

#if (NGX_HAVE_INET6)
        len = ngx_inet6_ntop(ip, p, NGX_INET6_ADDRSTRLEN);
        p = ngx_cpymem(p + len, "/64", 3);
        value->len = p - value->data;
        return NGX_OK;
#else
        return NGX_DECLINED;
#endif

    case NGX_MAIL_SMTP_EXT_RL_USER:
        *value = s->login;
        return NGX_OK;

    case NGX_MAIL_SMTP_EXT_RL_SENDER:
        *value = ctx->from;
        return NGX_OK;

    default: /* sender_domain, rcpt_domain */
        addr = (rl->key == NGX_MAIL_SMTP_EXT_RL_SENDER_DOMAIN)
               ? &ctx->from : ctx->pending_rcpt;

        if (addr == NULL) {
            return NGX_DECLINED;
        }

        at = NULL;

        for (p = addr->data; p < addr->data + addr->len; p++) {
            if (*p == '@') {
                at = p;
            }
        }

        if (at == NULL) {
            value->data = addr->data + addr->len;
            value->len = 0;
            return NGX_OK;
        }

        value->data = at + 1;
        value->len = addr->data + addr->len - value->data;
        return NGX_OK;
    }
}


static void
ngx_mail_smtp_ext_ratelimit_handler(void *data, redisReply **replies,
    ngx_uint_t n)
{
    ngx_mail_session_t  *s = data;

    redisReply                     *r;
    ngx_uint_t                      refused;
    ngx_connection_t               *c;
    ngx_mail_smtp_ext_edge_t       *edge;
    ngx_mail_smtp_ext_srv_conf_t   *sscf;
    ngx_mail_smtp_ext_redis_cmd_t   cmds[2];

    c = s->connection;
    edge = ngx_mail_smtp_ext_edge_get(s);

    if (edge->done) {
        /* refused meanwhile (pregreet): the reply is on its way */
        return;
    }

    if (replies == NULL) {
        ngx_log_error(NGX_LOG_WARN, c->log, 0,
                      "smtp_ext: %s rate limit not checked, Redis is "
                      "unavailable or timed out: allowed",
                      ngx_mail_smtp_ext_rl_events[edge->rl_event]);

        ngx_mail_smtp_ext_rl_count_error(edge);
        ngx_mail_smtp_ext_ratelimit_done(s, 0);
        return;
    }

    r = replies[n - 1];

    if (r->type == REDIS_REPLY_ERROR && !edge->rl_noscript
        && r->len >= 8 && ngx_strncmp(r->str, "NOSCRIPT", 8) == 0)
    {
        /* a restarted or flushed Redis: load the script, call again */

        sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

        edge->rl_noscript = 1;

        cmds[0].argc = 3;
        cmds[0].argv = (const char *[]) { "SCRIPT", "LOAD",
                           (const char *) ngx_mail_smtp_ext_rl_script.data };
        cmds[0].argvlen = (const size_t []) { 6, 4,
                                         ngx_mail_smtp_ext_rl_script.len };

        cmds[1].argc = edge->rl_argc;
        cmds[1].argv = edge->rl_argv;
        cmds[1].argvlen = edge->rl_argvlen;

        if (ngx_mail_smtp_ext_redis_query(sscf->redis, c->pool, cmds, 2,
                                        ngx_mail_smtp_ext_ratelimit_handler, s)
            == NGX_OK)
        {
            return;
        }

        ngx_mail_smtp_ext_ratelimit_handler(s, NULL, 0);
        return;
    }

    refused = ngx_mail_smtp_ext_ratelimit_result(s, r);

    ngx_mail_smtp_ext_ratelimit_done(s, refused);
}


/* 1: the event is refused; every rule over its limit is logged */

static ngx_uint_t
ngx_mail_smtp_ext_ratelimit_result(ngx_mail_session_t *s, redisReply *r)
{
    ngx_uint_t                      i, refused;
    ngx_connection_t               *c;
    ngx_mail_smtp_ext_edge_t       *edge;
    ngx_mail_smtp_ext_ratelimit_t  *rl;

    c = s->connection;
    edge = ngx_mail_smtp_ext_edge_get(s);

    if (r->type != REDIS_REPLY_ARRAY || r->elements != edge->rl_n + 1) {
        ngx_log_error(NGX_LOG_WARN, c->log, 0,
                      "smtp_ext: %s rate limit not checked, Redis "
                      "answered %s%*s: allowed",
                      ngx_mail_smtp_ext_rl_events[edge->rl_event],
                      r->type == REDIS_REPLY_ERROR ? "" : "unexpectedly",
                      r->type == REDIS_REPLY_ERROR ? (size_t) r->len : 0,
                      r->type == REDIS_REPLY_ERROR ? r->str : "");

        ngx_mail_smtp_ext_rl_count_error(edge);
        return 0;
    }

    for (i = 0; i <= edge->rl_n; i++) {
        if (r->element[i]->type != REDIS_REPLY_INTEGER) {
            ngx_log_error(NGX_LOG_WARN, c->log, 0,
                          "smtp_ext: %s rate limit not checked, Redis "
                          "answered unexpectedly: allowed",
                          ngx_mail_smtp_ext_rl_events[edge->rl_event]);

            ngx_mail_smtp_ext_rl_count_error(edge);
            return 0;
        }
    }

    refused = (r->element[edge->rl_n]->integer == 1);

    for (i = 0; i < edge->rl_n; i++) {
        rl = edge->rl_rules[i];

        if (r->element[i]->integer != 1) {
            ngx_mail_smtp_ext_metric_ratelimit(rl->event, rl->key,
                                               NGX_SMTP_EXT_M_ALLOW);
            continue;
        }

        ngx_mail_smtp_ext_metric_ratelimit(rl->event, rl->key,
                                           NGX_SMTP_EXT_M_REJECT);

        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "smtp_ext: %srate limit exceeded: event=%s key=%s "
                      "value=\"%V\" client=%V",
                      rl->dry_run ? "dry run: " : "",
                      ngx_mail_smtp_ext_rl_events[rl->event],
                      ngx_mail_smtp_ext_rl_keys[rl->key],
                      &edge->rl_values[i], &c->addr_text);
    }

    return refused;
}



/* Redis could not check: every rule of the event counts an error */

static void
ngx_mail_smtp_ext_rl_count_error(ngx_mail_smtp_ext_edge_t *edge)
{
    ngx_uint_t  i;

    for (i = 0; i < edge->rl_n; i++) {
        ngx_mail_smtp_ext_metric_ratelimit(edge->rl_rules[i]->event,
                                           edge->rl_rules[i]->key,
                                           NGX_SMTP_EXT_M_ERROR);
    }
}

static void
ngx_mail_smtp_ext_ratelimit_done(ngx_mail_session_t *s, ngx_uint_t refused)
{
    ngx_uint_t                 event;
    ngx_mail_smtp_ext_edge_t  *edge;

    edge = ngx_mail_smtp_ext_edge_get(s);
    event = edge->rl_event;

    if (edge->rl_pool) {
        ngx_destroy_pool(edge->rl_pool);
        edge->rl_pool = NULL;
    }

    switch (event) {

    case NGX_MAIL_SMTP_EXT_RL_CONNECT:
        if (refused) {
            ngx_mail_smtp_ext_metric_reject(s, NGX_SMTP_EXT_M_RATELIMIT);
            ngx_mail_smtp_ext_edge_refuse(s, &ngx_mail_smtp_ext_rl_connect,
                                          "connect rate limit");
            return;
        }

        ngx_mail_smtp_ext_edge_next(s);
        return;

    case NGX_MAIL_SMTP_EXT_RL_MAIL:
        ngx_mail_smtp_ext_mail_limited(s, refused
                                          ? &ngx_mail_smtp_ext_rl_mail
                                          : NULL);
        return;

    default: /* rcpt */
        if (refused) {
            ngx_mail_smtp_ext_lookup_done(s, &ngx_mail_smtp_ext_rl_rcpt);
            return;
        }

        edge->rcpt_passed = 1;
        ngx_mail_smtp_ext_rcpt_routed(s);
        return;
    }
}
