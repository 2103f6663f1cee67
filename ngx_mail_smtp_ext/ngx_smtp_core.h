
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * The SMTP protocol core: command parsing, backend reply parsing, reply
 * helpers and the DATA scanner.  It does no I/O, allocates nothing and
 * includes no nginx header, so that it can be unit-tested and fuzzed on
 * its own (see t/unit and fuzz/).  The nginx glue calls it with buffers
 * it owns.
 */


#ifndef _NGX_SMTP_CORE_H_INCLUDED_
#define _NGX_SMTP_CORE_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>


/*
 * Strict ISO modes (-std=c99) hide glibc's u_char; nginx builds and
 * _DEFAULT_SOURCE builds get it from <sys/types.h> as usual.
 */
#if defined(__GLIBC__) && !defined(__u_char_defined)
typedef unsigned char  u_char;
#endif


#define NGX_SMTP_OK                 0
#define NGX_SMTP_ERROR             -1
#define NGX_SMTP_AGAIN             -2


/* RFC 5321 4.5.3.1.4: command line including CRLF */
#define NGX_SMTP_MAX_LINE           512


/* same layout as ngx_str_t, so that the glue may cast */
typedef struct {
    size_t                  len;
    u_char                 *data;
} ngx_smtp_str_t;


/* line splitter: finds one command line in client input */

typedef struct {
    u_char                 *start;      /* first byte of the line */
    size_t                  len;        /* without the line terminator */
    size_t                  consumed;   /* bytes up to and including LF */
} ngx_smtp_line_t;

/*
 * Looks for LF in [p, last).  A line ends at LF; a CR right before it is
 * stripped (bare LF is tolerated in commands, not in DATA).  The limit
 * counts the line as if it ended with CRLF: with max 512, 510 octets of
 * command are fine and 511 are too long.
 *   NGX_SMTP_OK               line found, *line filled
 *   NGX_SMTP_AGAIN            no LF yet and (last - p) < max
 *   NGX_SMTP_LINE_TOO_LONG    the line (with its CRLF) exceeds max octets;
 *                             line->consumed = bytes to drop: up to and
 *                             including the LF if one was seen, else all;
 *                             line->len = 1 if the LF was seen, else 0
 */
#define NGX_SMTP_LINE_TOO_LONG      1

int ngx_smtp_find_line(u_char *p, u_char *last, size_t max,
    ngx_smtp_line_t *line);


/* commands */

typedef enum {
    NGX_SMTP_CMD_UNKNOWN = 0,
    NGX_SMTP_CMD_HELO,
    NGX_SMTP_CMD_EHLO,
    NGX_SMTP_CMD_MAIL,
    NGX_SMTP_CMD_RCPT,
    NGX_SMTP_CMD_DATA,
    NGX_SMTP_CMD_RSET,
    NGX_SMTP_CMD_NOOP,
    NGX_SMTP_CMD_QUIT,
    NGX_SMTP_CMD_VRFY,
    NGX_SMTP_CMD_EXPN,
    NGX_SMTP_CMD_HELP,
    NGX_SMTP_CMD_STARTTLS,
    NGX_SMTP_CMD_AUTH,
    NGX_SMTP_CMD_BDAT
} ngx_smtp_cmd_e;


#define NGX_SMTP_BODY_NONE          0
#define NGX_SMTP_BODY_7BIT          1
#define NGX_SMTP_BODY_8BITMIME      2


typedef struct {
    ngx_smtp_cmd_e          cmd;

    /*
     * everything after the verb and the spaces that follow it, trailing
     * spaces removed (HELO/EHLO domain, VRFY/HELP argument, AUTH
     * mechanism and initial response)
     */
    ngx_smtp_str_t          arg;

    /* MAIL and RCPT */
    ngx_smtp_str_t          path;       /* reverse/forward path without
                                           "<" ">" and without a source
                                           route; empty for "<>" */
    ngx_smtp_str_t          params;     /* raw parameters after ">",
                                           leading spaces removed */
    off_t                   size;       /* SIZE=, -1 if absent */
    ngx_smtp_str_t          auth;       /* AUTH= value, raw xtext
                                           (7-bit, not decoded) */
    /* DSN (RFC 3461): values as sent, checked; the glue decides */
    ngx_smtp_str_t          dsn[2];     /* "RET=.." and "ENVID=.." of
                                           MAIL, "NOTIFY=.." and
                                           "ORCPT=.." of RCPT, as sent */

    /* BDAT n [LAST] (RFC 3030) */
    off_t                   chunk;
    unsigned                last:1;

    unsigned                body:2;     /* NGX_SMTP_BODY_* */
    unsigned                smtputf8:1;
    unsigned                utf8_path:1;  /* path has octets >= 0x80 */
    unsigned                null_path:1;  /* "<>" */

    /* AUTH: mechanism (upper-cased copy not made: compare caseless) */
    ngx_smtp_str_t          mech;
    ngx_smtp_str_t          initial;    /* initial response, may be "=" */
} ngx_smtp_cmd_t;


/*
 * Parses one command line (without CRLF, as found by ngx_smtp_find_line).
 * The verb is the octets up to the first space, caseless.  Results:
 *   NGX_SMTP_OK               cmd filled
 *   NGX_SMTP_E_UNKNOWN        unknown verb                  500 5.5.2
 *   NGX_SMTP_E_SYNTAX         bad arguments, a NUL or other
 *                             control octet (< 0x20 or 0x7f,
 *                             TAB and CR too) after a known
 *                             verb                          501 5.5.4
 *   NGX_SMTP_E_PARAM          unknown or bad MAIL/RCPT
 *                             parameter, a duplicate one,
 *                             SIZE= over off_t, any RCPT
 *                             parameter                     555 5.5.4
 *   NGX_SMTP_E_UTF8           8-bit MAIL path without the
 *                             SMTPUTF8 parameter            553 5.6.7
 * For errors other than NGX_SMTP_E_UNKNOWN cmd->cmd is still set.
 *
 * Rules:
 *   HELO/EHLO need one argument (a domain or address literal; any
 *   printable text is accepted, as Postfix does by default).
 *   MAIL needs "FROM:" and RCPT "TO:" (caseless, spaces allowed after the
 *   colon), then a path in angle brackets; "<>" only for MAIL; RCPT also
 *   takes "<postmaster>" (no domain); a source route "@a,@b:" is dropped.
 *   Local part: dot-string or quoted string; domain: dot-separated
 *   labels (letters, digits, '-', octets >= 0x80) or an address literal
 *   "[...]" of printable octets other than "[", "\\" and "]".  Text right
 *   after ">" without a space is a syntax error.
 *   MAIL parameters: SIZE=digits (1 to 20), BODY=7BIT|8BITMIME,
 *   SMTPUTF8 (no value), AUTH=xtext (7-bit), RET=FULL|HDRS and
 *   ENVID=xtext (up to 100 octets).  RCPT parameters: NOTIFY=NEVER or a
 *   list of SUCCESS, FAILURE, DELAY, and ORCPT=addr-type;xtext (RFC
 *   3461).  A bad RET, ENVID, NOTIFY or ORCPT value is NGX_SMTP_E_SYNTAX
 *   (501); the DSN parameters, as they came, are in cmd->dsn[].
 *   Each may appear once; keywords and BODY values are caseless.
 *   BDAT takes a chunk size (digits, up to the largest off_t) and an
 *   optional LAST; anything else is NGX_SMTP_E_SYNTAX, and then
 *   cmd->chunk is -1: the glue cannot know where the chunk ends.
 *   An 8-bit RCPT path only sets utf8_path: SMTPUTF8 belongs to the
 *   transaction, the glue decides.
 *   DATA, RSET, QUIT, STARTTLS take no argument (501 otherwise); NOOP,
 *   HELP, VRFY, EXPN and BDAT take any; AUTH needs a mechanism (letters,
 *   digits, '-', '_'); an optional initial response follows after spaces;
 *   a third word is a syntax error.
 */
#define NGX_SMTP_E_UNKNOWN          1
#define NGX_SMTP_E_SYNTAX           2
#define NGX_SMTP_E_PARAM            3
#define NGX_SMTP_E_UTF8             4

int ngx_smtp_parse_command(u_char *line, size_t len, ngx_smtp_cmd_t *cmd);


/* backend replies */

typedef struct {
    /* state between calls, zero before the first call */
    size_t                  scanned;

    /* results */
    unsigned                code;       /* 3 digits, e.g. 250 */
    size_t                  len;        /* octets of the whole reply,
                                           every line with its CRLF */
    unsigned                lines;
} ngx_smtp_reply_t;

/*
 * Looks for one complete, possibly multiline, reply at p.
 *   NGX_SMTP_OK       reply complete: [p, p + r->len)
 *   NGX_SMTP_AGAIN    need more input (r->scanned remembers progress;
 *                     p must stay the start of the reply)
 *   NGX_SMTP_ERROR    not an SMTP reply: a line without 3 digits (the
 *                     first one 2 to 5) and ' ' or '-' (a bare 3-digit
 *                     line counts as final), codes that differ between
 *                     lines, a line longer than max octets with its CRLF,
 *                     a line not ending in CRLF (bare LF), or a NUL
 */
int ngx_smtp_parse_reply(u_char *p, u_char *last, size_t max,
    ngx_smtp_reply_t *r);


/* EHLO keywords of a backend, from its complete reply */

#define NGX_SMTP_CAP_PIPELINING     0x0001
#define NGX_SMTP_CAP_SIZE           0x0002
#define NGX_SMTP_CAP_8BITMIME       0x0004
#define NGX_SMTP_CAP_SMTPUTF8       0x0008
#define NGX_SMTP_CAP_STARTTLS       0x0010
#define NGX_SMTP_CAP_XCLIENT        0x0020
#define NGX_SMTP_CAP_ENHANCED       0x0040
#define NGX_SMTP_CAP_CHUNKING       0x0080
#define NGX_SMTP_CAP_DSN            0x0100
#define NGX_SMTP_CAP_AUTH           0x0200

/* XCLIENT attributes a backend lists after the XCLIENT keyword */
#define NGX_SMTP_XCLIENT_NAME       0x0001
#define NGX_SMTP_XCLIENT_ADDR       0x0002
#define NGX_SMTP_XCLIENT_PORT       0x0004
#define NGX_SMTP_XCLIENT_PROTO      0x0008
#define NGX_SMTP_XCLIENT_HELO       0x0010
#define NGX_SMTP_XCLIENT_LOGIN      0x0020
#define NGX_SMTP_XCLIENT_REVERSE_NAME  0x0040
#define NGX_SMTP_XCLIENT_DESTADDR   0x0080
#define NGX_SMTP_XCLIENT_DESTPORT   0x0100

typedef struct {
    unsigned                caps;       /* NGX_SMTP_CAP_* */
    unsigned                xclient;    /* NGX_SMTP_XCLIENT_* */
    off_t                   size;       /* SIZE n, 0 if none or no limit */
} ngx_smtp_ehlo_t;

/*
 * reply as returned by ngx_smtp_parse_reply; keywords are caseless, the
 * first line (the backend's name) is skipped, "AUTH=..." counts as AUTH,
 * and a SIZE over off_t counts as no limit
 */
void ngx_smtp_parse_ehlo(u_char *p, size_t len, ngx_smtp_ehlo_t *ehlo);


/*
 * Copies a complete backend reply [p, p + len) to dst so that every line
 * carries an enhanced status code (RFC 3463): lines that have one
 * ("d.ddd.ddd" followed by a space or the end of the line, after "NNN "
 * or "NNN-") keep it, lines that have none get "C.0.0 " with C the code's
 * first digit ("NNN" alone becomes "NNN C.0.0").  Control octets other
 * than the CRLF that ends a line (a stray CR too) are replaced with '?'.
 * Returns the octets written; dst must hold len + 6 * lines octets.
 */
size_t ngx_smtp_copy_reply(u_char *dst, u_char *p, size_t len);

/*
 * Copies a complete reply as ngx_smtp_copy_reply() does, into at most
 * size octets: the first lines that fit whole, then the final line, so
 * that the result is a well-formed reply with the same code (RFC 5321
 * 4.2.1).  A final line that alone does not fit is cut and given a CRLF
 * of its own.  Returns the octets written, 0 when size is below
 * NGX_SMTP_SHORT_REPLY_MIN.
 */
#define NGX_SMTP_SHORT_REPLY_MIN    32
size_t ngx_smtp_shorten_reply(u_char *dst, size_t size, u_char *p,
    size_t len);


/*
 * xtext (RFC 3461 4): '+', '=', octets below '!' or above '~' become
 * "+XX".  With dst == NULL returns the encoded length only.
 */
size_t ngx_smtp_xtext_encode(u_char *dst, u_char *src, size_t len);


/* the DATA scanner */

#define NGX_SMTP_BARE_LF_NORMALIZE  0
#define NGX_SMTP_BARE_LF_REJECT     1

typedef struct {
    /* configuration, set before the first call */
    off_t                   max_size;   /* 0: no limit */
    unsigned                reject:1;   /* NGX_SMTP_BARE_LF_REJECT */

    /* state: zero the rest before the first call */
    unsigned                state;
    off_t                   size;       /* message octets, counted as
                                           sent to the backend (the
                                           normalized, dot-stuffed form
                                           without the final ".\r\n");
                                           counting goes on after
                                           too_big and bare, for logs */
    off_t                   dots;       /* line-start dots in the output:
                                           size - dots is the message
                                           after dot-unstuffing */
    unsigned                bare:1;     /* a bare CR or LF was seen
                                           (set in both modes) */
    unsigned                too_big:1;  /* size went over max_size */
} ngx_smtp_data_t;

/*
 * Scans DATA input from the client in [in, in_last) and writes what the
 * backend must receive to [out, out_last).  The input is the dot-stuffed
 * wire form; the output is too, so the glue sends it as it is.  Octets
 * other than CR and LF, NUL and 8-bit ones included, pass unchanged: the
 * content is the backend's business.  The output does not depend on how
 * the input is split across calls or on the room in out.
 *
 * - End of data is CRLF "." CRLF only; the DATA command's own CRLF counts
 *   as the CRLF before the first line.  The final ".\r\n" is written to
 *   the output only when the message is good (not bare in reject mode,
 *   not too big).
 * - normalize: a bare LF or a bare CR becomes CRLF in the output.  A line
 *   that would then read "." alone in the output without being the end of
 *   data (it started after a bare line ending or ends with one) is written
 *   as ".." so that the backend can never see an end of data that the
 *   scanner did not see.
 * - reject: at the first bare CR or LF, d->bare is set and nothing more is
 *   written; input is still consumed up to the end of data.
 * - when d->size goes over max_size, d->too_big is set and nothing past
 *   the first max_size octets is written (the cut may fall inside a
 *   line); input is still consumed up to the end of data.  A message of
 *   exactly max_size octets is fine.
 *
 * Returns NGX_SMTP_AGAIN when all input was consumed (or out is full: the
 * glue tells by *in_used < in_last - in) and NGX_SMTP_OK at the end of
 * data; *in_used then stops right after the final LF, so that pipelined
 * commands stay in the input.  *in_used and *out_used give the octets
 * consumed and written.  After NGX_SMTP_OK further calls return it again
 * and consume nothing: zero the state for the next message.
 * The scanner stops before writing past out_last; out must have room for
 * at least 8 octets for progress to be guaranteed.
 */
int ngx_smtp_data_scan(ngx_smtp_data_t *d, u_char *in, u_char *in_last,
    u_char *out, u_char *out_last, size_t *in_used, size_t *out_used);

/*
 * The zero-copy path: how many octets at the start of [in, in_last) the
 * scanner would pass to the backend unchanged.  When that is at least
 * min, the state advances over them exactly as ngx_smtp_data_scan()
 * would, and the glue sends them from the input buffer itself; otherwise
 * nothing changes and 0 is returned.  Anything that needs the state
 * machine (a dot or CR held at a line start, a bare line ending, the end
 * of data, the size limit) ends the run.
 */
size_t ngx_smtp_data_verbatim(ngx_smtp_data_t *d, u_char *in,
    u_char *in_last, size_t min);


/* ==== AUTH payloads, password schemes, route targets (ngx_smtp_auth.c) ====
 *
 * Only recognizing and splitting: base64 decoding, hashing and pool or
 * address lookups stay in the nginx glue.  Results point into the input.
 */

/* an AUTH response line (RFC 4954 4) before base64 decoding */
#define NGX_SMTP_AUTH_DATA          0   /* base64; *decoded = its length */
#define NGX_SMTP_AUTH_EMPTY         1   /* "=" or an empty line */
#define NGX_SMTP_AUTH_CANCEL        2   /* "*" */
#define NGX_SMTP_AUTH_BAD           3   /* not base64 (RFC 4648 4) */

/*
 * Classifies a response line.  Base64 is strict: the alphabet, then "="
 * padding only at the end and only as much as the last group needs; an
 * unpadded last group of 2 or 3 characters is tolerated, of 1 is not.
 */
int ngx_smtp_sasl_response(u_char *p, size_t len, size_t *decoded);

/* a user name AUTH may look up: no NUL, CR or LF, at most this long */
#define NGX_SMTP_AUTH_MAX_USER      255

int ngx_smtp_sasl_user_valid(u_char *p, size_t len);

/*
 * PLAIN (RFC 4616), decoded: [authzid] NUL authcid NUL passwd.
 * NGX_SMTP_ERROR unless there are exactly two NULs and authcid is a valid
 * user name; the password may be empty (it then fails verification).
 */
int ngx_smtp_sasl_plain(u_char *p, size_t len, ngx_smtp_str_t *authzid,
    ngx_smtp_str_t *user, ngx_smtp_str_t *passwd);

/*
 * LOGIN, decoded: step 0 is the user name (must be valid, so not empty),
 * step 1 the password (may be empty, must not hold a NUL).
 */
#define NGX_SMTP_AUTH_LOGIN_USER    0
#define NGX_SMTP_AUTH_LOGIN_PASS    1

int ngx_smtp_sasl_login(int step, u_char *p, size_t len,
    ngx_smtp_str_t *out);

/*
 * CRAM-MD5 (RFC 2195), decoded: user SP digest, the digest 32 hex digits
 * after the last space; the user name (which may hold spaces) must be
 * valid.
 */
int ngx_smtp_sasl_cram(u_char *p, size_t len, ngx_smtp_str_t *user,
    ngx_smtp_str_t *digest);


/* stored password schemes (SPEC 4), recognized by their prefix */

typedef enum {
    NGX_SMTP_PW_INVALID = 0,    /* neither "{SCHEME}..." nor "$id$..." */
    NGX_SMTP_PW_UNKNOWN,        /* "{OTHER}..." */
    NGX_SMTP_PW_PLAIN,          /* {PLAIN} {CLEARTEXT} */
    NGX_SMTP_PW_CRYPT,          /* $id$..., {CRYPT}, {NAME-CRYPT} */
    NGX_SMTP_PW_SHA,
    NGX_SMTP_PW_SSHA,
    NGX_SMTP_PW_SHA256,
    NGX_SMTP_PW_SSHA256,
    NGX_SMTP_PW_SHA512,
    NGX_SMTP_PW_SSHA512
} ngx_smtp_pw_scheme_e;

/*
 * *rest: what follows "{SCHEME}", or the whole "$id$..." crypt(3) string.
 * Scheme names are caseless; a crypt scheme needs a non-empty rest.
 */
ngx_smtp_pw_scheme_e ngx_smtp_passwd_scheme(u_char *p, size_t len,
    ngx_smtp_str_t *rest);


/*
 * BDAT chunks (RFC 3030) as DATA for a backend without CHUNKING: the raw
 * message octets become the DATA wire form.  A "." at a line start is
 * doubled; every line ends in CRLF (a bare CR or LF becomes CRLF, or, in
 * reject mode, sets bare and stops the output); so the output can never
 * hold an end of data before the one ngx_smtp_bdat_end() writes.  size
 * counts the octets received; past max_size too_big is set and output
 * stops.
 */
typedef struct {
    /* configuration, set before the first call */
    off_t                   max_size;   /* 0: no limit */
    unsigned                reject:1;

    /* state: zero the rest before the first call */
    unsigned                state;
    off_t                   size;
    unsigned                bare:1;
    unsigned                too_big:1;
} ngx_smtp_bdat_t;

/* the most one input octet may write, and what the end may write */
#define NGX_SMTP_BDAT_GROWTH        4
#define NGX_SMTP_BDAT_END           5

/*
 * Converts [in, in + len) into out while out has NGX_SMTP_BDAT_GROWTH
 * octets of room; *in_used tells how much input was taken.  Returns the
 * octets written.  With out == NULL nothing is written (a check and a
 * count, for a backend that takes the chunks as they are).
 */
size_t ngx_smtp_bdat_convert(ngx_smtp_bdat_t *b, u_char *in, size_t len,
    u_char *out, size_t room, size_t *in_used);

/* the end of the message: a CRLF if it lacks one, then ".\r\n" */
size_t ngx_smtp_bdat_end(ngx_smtp_bdat_t *b, u_char *out);


/* route targets (SPEC 4), as a Redis value gives them */

#define NGX_SMTP_ROUTE_INVALID      0   /* empty, spaces, controls, ... */
#define NGX_SMTP_ROUTE_REJECT       1   /* "reject", caseless */
#define NGX_SMTP_ROUTE_NAME         2   /* no ':': a pool name */
#define NGX_SMTP_ROUTE_ADDR         3   /* IPv4:port or [IPv6]:port */
#define NGX_SMTP_ROUTE_HOST         4   /* name:port: configured only */

#define NGX_SMTP_ROUTE_MAX          255

typedef struct {
    ngx_smtp_str_t          host;       /* ADDR, HOST: without brackets */
    unsigned                port;       /* ADDR, HOST: 1-65535 */
    unsigned                ipv6:1;
} ngx_smtp_route_t;

/*
 * An IPv6 host is only checked for its characters (hex digits, ':' and
 * '.', at least two colons): the glue parses it and refuses what does
 * not parse.
 */
int ngx_smtp_route_target(u_char *p, size_t len, ngx_smtp_route_t *rt);


#endif /* _NGX_SMTP_CORE_H_INCLUDED_ */
