
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/* character classes shared by the protocol core's parsers */


#ifndef _NGX_SMTP_CHARS_H_INCLUDED_
#define _NGX_SMTP_CHARS_H_INCLUDED_


#define ngx_smtp_lc(c)     (u_char) (((c) >= 'A' && (c) <= 'Z') ? ((c) | 0x20) \
                                                                 : (c))
#define ngx_smtp_digit(c)  ((c) >= '0' && (c) <= '9')
#define ngx_smtp_alpha(c)  (((c) | 0x20) >= 'a' && ((c) | 0x20) <= 'z')
#define ngx_smtp_ctl(c)    ((c) < 0x20 || (c) == 0x7f)

/* the largest positive off_t, for 32- and 64-bit off_t alike */
#define NGX_SMTP_OFF_T_MAX                                                    \
    ((off_t) ((((uint64_t) 1) << (sizeof(off_t) * 8 - 1)) - 1))


#endif /* _NGX_SMTP_CHARS_H_INCLUDED_ */
