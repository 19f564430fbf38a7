# Installs qmpgate: the binary, its manual pages, shell completions and systemd units.
#
#   make                                     build the release binary
#   make install [PREFIX=/usr/local] [DESTDIR=/staging]
#                                            build, then install under DESTDIR/PREFIX
#   make install BIN=path/to/qmpgate         install a binary built already
#   make uninstall [PREFIX=...] [DESTDIR=...]
#
# The manual pages and completions come from the binary being installed (`qmpgate
# man`, `qmpgate completions`), so they describe exactly its command line. The
# service unit is given the installed binary's path.

PREFIX = /usr/local
DESTDIR =
CARGO = cargo
# The binary to install; left empty, it is built here first.
BIN =

built := $(or $(CARGO_TARGET_DIR),target)/release/qmpgate
qmpgate := $(or $(BIN),$(built))

bindir := $(PREFIX)/bin
man1dir := $(PREFIX)/share/man/man1
bashdir := $(PREFIX)/share/bash-completion/completions
zshdir := $(PREFIX)/share/zsh/site-functions
fishdir := $(PREFIX)/share/fish/vendor_completions.d
unitdir := $(PREFIX)/lib/systemd/system

.PHONY: all build install uninstall

all: build

build:
	$(CARGO) build --release --locked -p qmpgate

# Generated files are written through the umask; chmod makes them readable by all,
# as installed files are (install(1) does that for the rest).
install: $(if $(BIN),,build)
	install -d $(DESTDIR)$(bindir) $(DESTDIR)$(man1dir) $(DESTDIR)$(bashdir) \
		$(DESTDIR)$(zshdir) $(DESTDIR)$(fishdir) $(DESTDIR)$(unitdir)
	install -m 0755 $(qmpgate) $(DESTDIR)$(bindir)/qmpgate
	$(qmpgate) man --out $(DESTDIR)$(man1dir)
	$(qmpgate) completions bash > $(DESTDIR)$(bashdir)/qmpgate
	$(qmpgate) completions zsh > $(DESTDIR)$(zshdir)/_qmpgate
	$(qmpgate) completions fish > $(DESTDIR)$(fishdir)/qmpgate.fish
	sed 's|/usr/local/bin/qmpgate|$(bindir)/qmpgate|' contrib/systemd/qmpgate@.service \
		> $(DESTDIR)$(unitdir)/qmpgate@.service
	cp contrib/systemd/qmpgate@.socket $(DESTDIR)$(unitdir)/qmpgate@.socket
	chmod 0644 $(DESTDIR)$(man1dir)/qmpgate.1 $(DESTDIR)$(man1dir)/qmpgate-*.1 \
		$(DESTDIR)$(bashdir)/qmpgate $(DESTDIR)$(zshdir)/_qmpgate \
		$(DESTDIR)$(fishdir)/qmpgate.fish $(DESTDIR)$(unitdir)/qmpgate@.*

uninstall:
	rm -f $(DESTDIR)$(bindir)/qmpgate \
		$(DESTDIR)$(man1dir)/qmpgate.1 $(DESTDIR)$(man1dir)/qmpgate-*.1 \
		$(DESTDIR)$(bashdir)/qmpgate $(DESTDIR)$(zshdir)/_qmpgate \
		$(DESTDIR)$(fishdir)/qmpgate.fish \
		$(DESTDIR)$(unitdir)/qmpgate@.service $(DESTDIR)$(unitdir)/qmpgate@.socket
