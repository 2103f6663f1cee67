# ngx_mail_smtp_ext: build, test and demo.
#
#   make deps     install the Debian 12 packages (quick when present)
#   make build    build/modules/ngx_mail_smtp_ext_module.so for Debian's
#                 nginx 1.22.1 (or, with NGINX_SRC=DIR, for that tree)
#   make unit     C unit tests of the protocol core (ASan + UBSan)
#   make fuzz     libFuzzer runs, FUZZ_TIME seconds each
#   make test     deps + build + unit + the Perl integration tests in t/
#   make asan     the integration tests with the module under ASan
#   make run      deps + build + a local demo on 127.0.0.1:2525
#   make deb      deps + the Debian package, in build/ (debian/)
#   make clean

ROOT        := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
BUILD       := $(ROOT)/build
MODULE      := ngx_mail_smtp_ext_module
SRCDIR      := $(ROOT)/ngx_mail_smtp_ext

# Debian's nginx-dev tree and the configure flags of Debian's binary
DEB_SRC     := /usr/share/nginx/src
DEB_TREE    := $(BUILD)/nginx-src

# optional upstream nginx source tree (release tarball or git checkout)
NGINX_SRC   ?=
UP_SRC      := $(abspath $(NGINX_SRC))
UP_TREE     := $(BUILD)/nginx-upstream
UP_FLAGS    := --with-compat --with-threads --with-mail=dynamic \
               --with-mail_ssl_module

CORE_SRCS   := $(wildcard $(SRCDIR)/ngx_smtp_*.c)
CORE_HDRS   := $(wildcard $(SRCDIR)/ngx_smtp_*.h)

UNIT_SRCS   := $(wildcard $(ROOT)/t/unit/test_*.c)
UNIT_BINS   := $(patsubst $(ROOT)/t/unit/%.c,$(BUILD)/%,$(UNIT_SRCS))
UNIT_CC     ?= cc
UNIT_CFLAGS := -std=c99 -D_DEFAULT_SOURCE -Wall -Wextra -Werror -O1 -g \
               -fsanitize=address,undefined -fno-omit-frame-pointer \
               -fno-sanitize-recover=undefined

FUZZ_SRCS   := $(wildcard $(ROOT)/fuzz/fuzz_*.c)
FUZZ_BINS   := $(patsubst $(ROOT)/fuzz/%.c,$(BUILD)/%,$(FUZZ_SRCS))
FUZZ_CC     ?= clang
FUZZ_CFLAGS := -g -O1 -fsanitize=fuzzer,address,undefined \
               -fno-sanitize-recover=undefined
FUZZ_TIME   ?= 60

TEST_JOBS   ?= 2
PROVE       ?= prove
PROVE_FLAGS ?=

ifneq ($(strip $(NGINX_SRC)),)
TREE        := $(UP_TREE)
MOD_OUT     := $(BUILD)/modules-upstream/$(MODULE).so
else
TREE        := $(DEB_TREE)
MOD_OUT     := $(BUILD)/modules/$(MODULE).so
endif

# nginx's configure adds -Werror only when CFLAGS is unset, and
# variables given on our command line (CFLAGS=, CC=) must not override
# those of nginx's own objs/Makefile: keep both out.
unexport CFLAGS
MAKEOVERRIDES :=
NGX_MAKE    := $(MAKE) -f objs/Makefile

.PHONY: all deps build unit fuzz test asan run bench deb clean FORCE

# "make -j run" must install before building; nginx's own make, called
# from here, still compiles in parallel
.NOTPARALLEL:

all: build

deps:
	@$(ROOT)/scripts/deps.sh

build: $(MOD_OUT)

# --- Debian tree -------------------------------------------------------

# a private copy: configure writes objs/ and Makefile into the tree
$(DEB_TREE)/.copied: $(DEB_SRC)/conf_flags $(DEB_SRC)/src/core/nginx.h
	rm -rf $(DEB_TREE)
	mkdir -p $(BUILD)
	cp -a $(DEB_SRC) $(DEB_TREE)
	touch $@

$(DEB_TREE)/objs/Makefile: $(DEB_TREE)/.copied $(ROOT)/config
	cd $(DEB_TREE) && env -u CFLAGS bash -c '. ./conf_flags && \
	    ./configure "$${NGX_CONF_FLAGS[@]}" \
	        --with-mail=dynamic --with-mail_ssl_module \
	        --add-dynamic-module=$(ROOT)' > $(BUILD)/configure.log 2>&1 \
	    || { tail -n 30 $(BUILD)/configure.log; exit 1; }
	@grep -q -- '-Werror' $@ \
	    || { echo "objs/Makefile lacks -Werror" >&2; exit 1; }

# --- upstream tree -----------------------------------------------------

$(UP_TREE)/.copied:
	@test -f $(UP_SRC)/src/core/nginx.h \
	    || { echo "NGINX_SRC=$(NGINX_SRC): no nginx source" >&2; exit 1; }
	rm -rf $(UP_TREE)
	mkdir -p $(UP_TREE)
	cd $(UP_SRC) && tar --exclude=./objs --exclude=./.git \
	    --exclude=./.hg -cf - . | tar -C $(UP_TREE) -xf -
	echo '$(UP_SRC)' > $@

$(UP_TREE)/objs/Makefile: $(UP_TREE)/.copied $(ROOT)/config
	cd $(UP_TREE) && { [ -x configure ] && c=./configure \
	                                    || c=auto/configure; } && \
	    env -u CFLAGS $$c $(UP_FLAGS) --add-dynamic-module=$(ROOT) \
	        > $(BUILD)/configure-upstream.log 2>&1 \
	    || { tail -n 30 $(BUILD)/configure-upstream.log; exit 1; }
	@grep -q -- '-Werror' $@ \
	    || { echo "objs/Makefile lacks -Werror" >&2; exit 1; }

# --- the module ----------------------------------------------------------

# nginx's objs/Makefile tracks sources and headers itself; this rule
# always asks it, so an edited source is rebuilt and nothing else.
# An upstream tree also gets its nginx binary and ngx_mail_module.so:
# the module loads only into a binary built from that same tree.
$(MOD_OUT): $(TREE)/objs/Makefile FORCE
ifneq ($(strip $(NGINX_SRC)),)
	@if [ "$$(cat $(UP_TREE)/.copied)" != '$(UP_SRC)' ]; then \
	    echo "$(UP_TREE) is a copy of $$(cat $(UP_TREE)/.copied)," \
	         "not of $(UP_SRC): run 'make clean' first" >&2; exit 1; \
	fi
	+cd $(TREE) && $(NGX_MAKE) build
else
	+cd $(TREE) && $(NGX_MAKE) objs/$(MODULE).so
endif
	@mkdir -p $(dir $@)
	@cmp -s $(TREE)/objs/$(MODULE).so $@ \
	    || { cp $(TREE)/objs/$(MODULE).so $@.tmp && mv $@.tmp $@ \
	         && echo "built $@"; }

# --- unit tests and fuzzing ---------------------------------------------

$(BUILD)/test_%: $(ROOT)/t/unit/test_%.c $(CORE_SRCS) $(CORE_HDRS)
	@mkdir -p $(BUILD)
	$(UNIT_CC) $(UNIT_CFLAGS) -I $(SRCDIR) $(CORE_SRCS) $< -o $@

unit: $(UNIT_BINS)
	@test -n "$(UNIT_BINS)" || { echo "no t/unit/test_*.c" >&2; exit 1; }
	@set -e; for t in $(UNIT_BINS); do \
	    echo "== $$(basename $$t)"; \
	    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $$t; \
	done

$(BUILD)/fuzz_%: $(ROOT)/fuzz/fuzz_%.c $(CORE_SRCS) $(CORE_HDRS)
	@mkdir -p $(BUILD)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -I $(SRCDIR) $(CORE_SRCS) $< -o $@

# the Redis reply reader is plain hiredis: no protocol core, but libhiredis
REDIS_READER := $(SRCDIR)/ngx_mail_smtp_ext_redis_reader.c \
                $(SRCDIR)/ngx_mail_smtp_ext_redis_reader.h

# and limits small enough for fuzzer inputs to reach
FUZZ_REDIS_LIMITS := -DNGX_MAIL_SMTP_EXT_REDIS_MAX_STRING=4096 \
                     -DNGX_MAIL_SMTP_EXT_REDIS_MAX_ELEMENTS=64 \
                     -DNGX_MAIL_SMTP_EXT_REDIS_MAX_DEPTH=5 \
                     -DNGX_MAIL_SMTP_EXT_REDIS_MAX_REPLY=6144 \
                     -DNGX_MAIL_SMTP_EXT_REDIS_MAX_INPUT=5120

$(BUILD)/fuzz_redis: $(ROOT)/fuzz/fuzz_redis.c $(REDIS_READER) $(ROOT)/Makefile
	@mkdir -p $(BUILD)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_REDIS_LIMITS) -I $(SRCDIR) \
	    $(filter %.c,$(REDIS_READER)) $< -lhiredis -o $@

# Seeds, if the fuzz/ owner keeps any, are read from fuzz/corpus/NAME;
# new inputs go to build/corpus-NAME, crashes to build/fuzz-artifacts/.
fuzz: $(FUZZ_BINS)
	@test -n "$(FUZZ_BINS)" || { echo "no fuzz/fuzz_*.c" >&2; exit 1; }
	@set -e; mkdir -p $(BUILD)/fuzz-artifacts; \
	for f in $(FUZZ_BINS); do \
	    n=$$(basename $$f); n=$${n#fuzz_}; \
	    mkdir -p $(BUILD)/corpus-$$n; \
	    seeds=; [ -d $(ROOT)/fuzz/corpus/$$n ] && seeds=$(ROOT)/fuzz/corpus/$$n; \
	    echo "== fuzz_$$n for $(FUZZ_TIME)s"; \
	    $$f -max_total_time=$(FUZZ_TIME) -print_final_stats=1 \
	        -artifact_prefix=$(BUILD)/fuzz-artifacts/$$n- \
	        $(BUILD)/corpus-$$n $$seeds; \
	done

# --- integration tests and demo -----------------------------------------

# Every test takes its own free 127.0.0.1 ports and its own directory,
# so test files run in parallel.  With NGINX_SRC the tests run against
# that tree's nginx binary and ngx_mail_module.so.
ifneq ($(strip $(NGINX_SRC)),)
TEST_ENV    := NGINX_BIN=$(TREE)/objs/nginx \
               NGX_MAIL_MODULE=$(TREE)/objs/ngx_mail_module.so
endif

# deps first: on a fresh machine the nginx-dev tree is not there yet
test: deps build unit
	cd $(ROOT) && SMTP_EXT_MODULE=$(MOD_OUT) $(TEST_ENV) \
	    $(PROVE) -I t/lib -j$(TEST_JOBS) $(PROVE_FLAGS) t/

run: deps build
	SMTP_EXT_MODULE=$(MOD_OUT) $(TEST_ENV) $(ROOT)/scripts/demo.sh

# the module against stock nginx mail, nginx stream and direct delivery;
# about 10 minutes, not part of test; see docs/performance.md
bench: build
	SMTP_EXT_MODULE=$(MOD_OUT) $(TEST_ENV) $(ROOT)/bench/bench.py

# --- Debian package ----------------------------------------------------

# dpkg-buildpackage works on a copy in build/deb/ (it writes debian/build,
# debian/.debhelper and the package tree, and its output goes to the
# parent directory), so that the repository stays clean; the .deb is
# copied to build/.  As root or not: debian/control says
# Rules-Requires-Root: no.
DEB_NAME    := libnginx-mod-mail-smtp-ext
DEB_DIR     := $(BUILD)/deb

deb: deps
	@set -e; \
	ver=$$(dpkg-parsechangelog -l $(ROOT)/debian/changelog -S Version); \
	arch=$$(dpkg-architecture -qDEB_HOST_ARCH); \
	deb=$(DEB_NAME)_$${ver}_$${arch}.deb; \
	src=$(DEB_DIR)/$(DEB_NAME)-$${ver%-*}; \
	rm -rf $(DEB_DIR); mkdir -p $$src; \
	cd $(ROOT) && tar --exclude=./build --exclude=./.git \
	    --exclude=./.prove -cf - . | tar -C $$src -xf -; \
	cd $$src && dpkg-buildpackage -us -uc -b > $(DEB_DIR)/build.log 2>&1 \
	    || { tail -n 40 $(DEB_DIR)/build.log; \
	         echo "make deb: failed, see $(DEB_DIR)/build.log" >&2; \
	         exit 1; }; \
	cp $(DEB_DIR)/$$deb $(BUILD)/$$deb; \
	echo "built $(BUILD)/$$deb"

clean:
	rm -rf $(BUILD)

# the integration tests with the module built under AddressSanitizer
asan: unit
	@$(ROOT)/scripts/asan-test.sh
