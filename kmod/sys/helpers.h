/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The flat C surface of trustbind.ko. Everything the Rust side calls in the
 * kernel goes through these functions; every kernel struct, macro and static
 * inline stays in helpers.c. Types here are only integers and opaque
 * pointers, so the Rust declarations in sys/mod.rs cannot disagree with C
 * about a struct layout.
 */
#ifndef TRUSTBIND_HELPERS_H
#define TRUSTBIND_HELPERS_H

#include <linux/types.h>

/* --- Signals ----------------------------------------------------------- */

/* Blocks every signal but SIGKILL and SIGSTOP for the calling thread;
 * returns the old mask for tb_signals_restore(). */
u64 tb_signals_block(void);
/* Restores the mask tb_signals_block() returned; signals that came
 * meanwhile are then delivered as usual. */
void tb_signals_restore(u64 old);

/* --- Hashing (kernel crypto API, shash) -------------------------------- */

struct tb_hashers;

/* Allocates the "sha256" and "sha1" transforms; 0 or -errno. */
int tb_hashers_alloc(struct tb_hashers **out);
void tb_hashers_free(struct tb_hashers *h);
/* Driver name behind the transform (e.g. "sha256-avx2"); which: 0 sha256, 1 sha1. */
const char *tb_hashers_driver(const struct tb_hashers *h, int which);
/* One pass over data updates both digests. 0 or -errno. */
int tb_hashers_digest(struct tb_hashers *h, const u8 *data, size_t len,
		      u8 *sha256_out, u8 *sha1_out);

/* --- Exec interception (binfmt handler at the head of the list) -------- */

struct linux_binprm;

/* What the module knows about one exec, filled by tb_bprm_info(). */
struct tb_exec_info {
	u64 size;		/* i_size of the file being executed */
	u64 dev;		/* s_dev of its superblock */
	u64 ino;
	u64 change_cookie;	/* valid if has_change_cookie */
	u32 generation;
	u32 has_change_cookie;
	u32 uid, euid, gid;	/* of the exec'ing task, init user namespace */
	u32 loginuid;		/* audit login uid, (u32)-1 if unset */
	u32 sessionid;		/* audit session id, (u32)-1 if unset */
	u32 tgid, ptgid;	/* thread group ids of the task and its parent */
	u32 pid;		/* the exec'ing thread's id */
	u32 fs_magic;		/* s_magic of its super block (all fit in 32 bits) */
	u64 start_ns;		/* boot-based start time of the task's group leader */
	u64 pstart_ns;		/* same, of the parent's group leader */
};

/* Inserts the handler at the head of the binfmt list. */
void tb_exec_register(void);
void tb_exec_unregister(void);
/* The path of the file this round of the exec opened (script, then its
 * interpreter); NUL-terminated, valid during the handler. */
const char *tb_bprm_path(const struct linux_binprm *bprm);
/* Identity of the file and the task. 0 or -errno. */
int tb_bprm_info(const struct linux_binprm *bprm, struct tb_exec_info *out);
/* The file's mode and owner, and whether the kernel would honour a
 * set-uid bit on it (applied only after the exec commits). */
void tb_bprm_setid(const struct linux_binprm *bprm, u32 *mode, u32 *owner,
		   bool *honoured);
/* SHA-256 and SHA-1 of the whole file, from offset 0, in one pass of
 * kernel_read. 0 or -errno (-EIO if the file is shorter than its size). */
int tb_hash_file(struct tb_hashers *h, const struct linux_binprm *bprm,
		 u8 *sha256_out, u8 *sha1_out);

/* Whether this round runs an interpreter a handler opened (a `#!` script's
 * or binfmt_misc's), rather than the file execve() named. */
bool tb_bprm_is_interp(const struct linux_binprm *bprm);

/* Whether the file starts with an ELF header of this machine (bprm->buf):
 * the ELF handler will open its PT_INTERP loader, if it names one. */
bool tb_bprm_is_native_elf(const struct linux_binprm *bprm);

/* Implemented in Rust (exec.rs): 0 lets the exec go on to the next
 * handler, -errno refuses it. */
int trustbind_exec_check(const struct linux_binprm *bprm);

/* --- Loader gate (ftrace IPMODIFY wrapper on open_exec()) -------------- */

/*
 * Files an exec opens itself once it is under way (open_exec() inside
 * execve: the ELF PT_INTERP loader, a `#!` interpreter, a binfmt_misc
 * interpreter) never reach a binfmt handler as the file execve() named,
 * and the ELF loader never reaches one at all. A wrapper on the exported
 * open_exec() asks about each such file, in the exec'ing task, after it
 * was opened and before it is used, with no VFS or fsnotify lock held.
 * The sched_process_exec tracepoint tells when an exec committed.
 */
struct file;

/* Hooks open_exec() and replace_mm_exe_file(), and attaches to the
 * sched_process_exec, _fork and _exit tracepoints. */
int tb_loader_hooks_start(void);
/* Undoes that and waits until no wrapper or probe of ours runs. */
void tb_loader_hooks_stop(void);
/* Identity of the opened file and the current task's context. */
int tb_open_info(const struct file *file, struct tb_exec_info *out);
/* SHA-256 and SHA-1 of the opened file, from offset 0. */
int tb_hash_open(struct tb_hashers *h, struct file *file, u8 *sha256_out,
		 u8 *sha1_out);
/* The file's path as a string in buf (len bytes); *out points into buf. */
int tb_open_name(const struct file *file, char *buf, int len, const char **out);
/* The first bytes of the exec'd file (bprm->buf) and their count. */
const u8 *tb_bprm_head(const struct linux_binprm *bprm, size_t *len);
/* The file this round of the exec runs. */
struct file *tb_bprm_file(const struct linux_binprm *bprm);
/* Up to len bytes of file from offset off (kernel_read): count or -errno. */
ssize_t tb_file_read(struct file *file, u64 off, u8 *buf, size_t len);

/* Implemented in Rust (exec.rs): called for each file an exec opens with
 * open_exec(); 0 lets the open go on, -errno fails it (and the exec). */
int trustbind_loader_check(struct file *file);
/* Implemented in Rust (exec.rs), called from tracepoints (must not sleep):
 * the exec of thread old_pid committed in process (tgid, start_ns); a new
 * process was forked; the last thread of a process exited. */
void trustbind_exec_committed(int old_pid, u32 tgid, u64 start_ns);
void trustbind_proc_forked(u32 ptgid, u64 pstart_ns, u32 tgid, u64 start_ns);
void trustbind_proc_exited(u32 tgid, u64 start_ns);
/* Implemented in Rust (exec.rs), called from an ftrace callback (must not
 * sleep): whether a process may change its mm->exe_file. */
bool trustbind_exe_replace_allowed(void);

/* --- Connect/accept qualification (ftrace IPMODIFY wrappers) ------------ */

/*
 * The exported inet_stream_connect() and inet_accept() (the connect and
 * accept of every TCP socket, IPv4 and IPv6), and tcp_sendmsg() when it
 * is a fast open send (sendto(MSG_FASTOPEN), which connects without
 * inet_stream_connect()), are redirected by ftrace to wrappers in
 * helpers.c, which call the originals directly. Only TCP
 * sockets of user space (not sk_kern_sock) of family AF_INET/AF_INET6 are
 * asked about; the rest pass untouched. tcp_close() (the end of every TCP
 * socket, a kTLS one's included) is redirected too, so the close of a
 * socket bound to a channel is reported (trustbind_net_closed).
 */

#define TB_NET_CONNECT 1
#define TB_NET_ACCEPT 2
/* A connect whose verdict required a bound channel, asked again once the
 * handshake is done (its real client end known), for the channel key. */
#define TB_NET_ESTABLISHED 3

struct socket;

/* One connection end, as trustbind_net_check() sees it. Addresses in
 * network byte order, IPv4 in the first 4 bytes; src is the client side,
 * dst the server side, on both kinds. As the socket names them: Rust
 * reports a v4-mapped pair as IPv4 (proto/src/addr.rs) and may rewrite
 * family and addresses here accordingly. */
struct tb_net_info {
	u32 kind;		/* TB_NET_CONNECT, _ACCEPT or _ESTABLISHED */
	u32 family;		/* 4 or 6 */
	u8 src_addr[16];
	u8 dst_addr[16];
	u16 src_port;		/* host byte order */
	u16 dst_port;
	u32 uid, euid, gid;	/* of the current task, init user namespace */
	u32 loginuid;		/* (u32)-1 if unset */
	u32 sessionid;		/* (u32)-1 if unset */
	u32 tgid, ptgid;
	/* Out, TB_NET_CONNECT: the verdict requires a bound channel, so the
	 * wrapper waits for the handshake and asks TB_NET_ESTABLISHED. */
	u32 bind;
	u64 start_ns;		/* boot-based start of the task's group leader */
	u64 pstart_ns;		/* same, of the parent's */
	u64 net;		/* the socket's network namespace's net_cookie */
	/* The socket (connect) or the accepted one (accept); the keys of a
	 * bound channel are installed on it (tb_ktls_install). */
	struct socket *sock;
};

/* The key material of one channel from this end's point of view. */
struct tb_channel_key {
	u8 tx_key[32];		/* AES-256-GCM, what this end sends */
	u8 rx_key[32];		/* and what it receives (v1: the same key) */
	u8 tx_salt[4];
	u8 tx_iv[8];
	u8 rx_salt[4];
	u8 rx_iv[8];
	u8 tls12;		/* TLS 1.2 records (NIC offload), else 1.3 */
};

/* Attaches the "tls" ULP (no keys yet: the socket still behaves as plain
 * TCP). kTLS attaches only to an ESTABLISHED socket, and a peer may close
 * (FIN: CLOSE_WAIT) as soon as it has its own key, so each end attaches
 * before it sends the ask whose answer can key its peer. 0, -EEXIST when a
 * ULP is attached already, or -errno. */
int tb_ktls_prepare(struct socket *sock);
/* Binds the connected TCP socket to its channel: the "tls" ULP (unless
 * tb_ktls_prepare() attached it), then kTLS
 * TLS 1.3 AES-256-GCM TLS_TX {key, tx_iv, tx_salt} and TLS_RX {key, rx_iv,
 * rx_salt}, record sequences 0. Data already queued is parsed as records
 * once TLS_RX is set. Zeroes *key (and its own copies) before returning.
 * 0 or -errno (a partly bound socket must then be reset). */
int tb_ktls_install(struct socket *sock, struct tb_channel_key *key);

/* Channel keys v2 (kmod/tickets.rs, docs/CHANNEL-KEYS-V2.md). */
#define TB_NET_LISTEN 4
/* Sends len bytes of buf on the connected socket as plain TCP (the
 * module's own ticket, before any key: tcp_sendmsg_locked() called from
 * here, so the held-send hook lets it through). 0 once all are queued,
 * else -errno. Process context. */
int tb_ticket_send(struct socket *sock, const u8 *buf, u32 len);
/* The connection's initial sequence numbers, this end's and the peer's,
 * as long as nothing was sent or read yet (write_seq - 1, copied_seq - 1).
 * Process context. */
void tb_tcp_isns(struct socket *sock, u32 *local, u32 *remote);
/* Reads the stream's first len bytes into buf if they start with magic
 * (4 bytes), waiting at most timeout_ms for each part: 1 read (consumed),
 * 0 the stream starts otherwise (nothing consumed), -ETIMEDOUT when not
 * even the magic came (nothing consumed), -EPROTO when the rest did not
 * (part consumed), or -errno. Process context. */
int tb_ticket_read(struct socket *sock, u8 *buf, u32 len, const u8 *magic,
		   u32 timeout_ms);
/* Random bytes (get_random_bytes). */
void tb_random(u8 *buf, u32 len);
/* Wall-clock seconds (ktime_get_real_seconds). */
u64 tb_real_seconds(void);
/* A listening socket's local end into info (kind TB_NET_LISTEN, the
 * current task); 0 when it is no watched TCP listener. */
int tb_listen_info(struct socket *sock, struct tb_net_info *info);
/* Implemented in Rust (net.rs): a listen() that succeeded. */
void trustbind_listen(struct socket *sock);
/* Aborts a TCP connection: a reset is sent if it was synchronised, and the
 * socket reports err. */
void tb_sock_abort(struct socket *sock, int err);

/* An identity of the socket's struct sock, as trustbind_net_closed() gets
 * it (its address; never 0 for a live socket). */
unsigned long tb_sock_id(const struct socket *sock);

/* Bound sockets by identity (tb_sock_id). tb_sock_ref() takes a reference
 * on a live socket, tb_sock_unref() drops one taken so; the others need
 * one held. Process context for tb_sock_idle_end() (it resets the
 * connection: tcp_abort(ETIMEDOUT)); any context for the counts. */
void tb_sock_ref(unsigned long sk_id);
void tb_sock_unref(unsigned long sk_id);
/* A TCP socket's counters as the kernel keeps them (tcp_sock): payload
 * bytes sent (acknowledged or not) and received, TLS records included, and
 * the sequence numbers of the next byte queued and the next sent. What
 * they mean for a channel is Rust's (proto/src/bound.rs). */
struct tb_tcp_counts {
	u64 bytes_sent, bytes_received;
	u32 write_seq, snd_nxt;
};
void tb_sock_counts(unsigned long sk_id, struct tb_tcp_counts *out);
void tb_sock_idle_end(unsigned long sk_id);
/* Arms the idle sweep (trustbind_net_idle() in a second), unless armed. */
void tb_idle_kick(void);
/* Implemented in Rust (net.rs): ends the channels idle too long; whether
 * a socket with an idle timeout is left (sweep again). Process context
 * (a workqueue), may take the device mutex. */
bool trustbind_net_idle(void);

/* Implemented in Rust (net.rs, proto/src/hold.rs): the send hold, the
 * sockets (by tb_sock_id-style identity) between their handshake and
 * their channel key. Lock-free, any context. enter is false when the
 * set has no room for sk now (wait for a leave); send_restarted counts a
 * send on a held socket (sent back to restart, or EAGAIN). */
bool trustbind_hold_enter(unsigned long sk);
void trustbind_hold_leave(unsigned long sk);
bool trustbind_hold_any(void);
bool trustbind_send_held(unsigned long sk);
void trustbind_send_restarted(void);

/* Registers the netfilter backstop and the ftrace ops on the TCP calls. 0 or -errno
 * (nothing left registered). */
int tb_net_hooks_start(void);
/* Unregisters them and waits until no task is inside a wrapper. */
void tb_net_hooks_stop(void);
/* SHA-256 and SHA-1 of the current task's executable (mm->exe_file), and
 * its size. 0 or -errno. */
int tb_hash_current_exe(struct tb_hashers *h, u8 *sha256_out, u8 *sha1_out,
			u64 *size_out);

/* Implemented in Rust (net.rs): 0 lets the connect go on (or hands the
 * accepted connection to the program), -errno refuses it. May sleep. For a
 * connect it may set info->bind; for an accept or an established connect
 * it installs the channel's keys itself (tb_ktls_install). */
int trustbind_net_check(struct tb_net_info *info);

/* A user-space connect of an IPv4/IPv6 stream socket (connect(), or a
 * fast-open send with flags O_NONBLOCK or 0) to uaddr (a struct
 * sockaddr): qualified, and a bound channel connected and keyed, by Rust
 * (net.rs). 0: connected and bound; TB_CONNECT_PLAIN: allowed as plain
 * TCP (or not watched), the caller runs its own original call; -errno:
 * refused or failed. Process context, no lock held. */
#define TB_CONNECT_PLAIN 1
int trustbind_connect(struct socket *sock, void *uaddr, int addr_len,
		      int flags);
/* The one-line calls trustbind_connect() makes (the socket the caller's):
 * tb_connect_info fills info for a connect the module watches (a user
 * TCP or MPTCP socket not yet connected, an address of its family): 1, or
 * 0 for any other; tb_connect_call is inet_stream_connect(); tb_connect_hold
 * clears fast open and holds the socket's sends (waiting for room in the
 * set): 0 or -ERESTARTSYS; tb_connect_unhold leaves the set and wakes the
 * waiters; tb_connect_abandon aborts a handshake still going on;
 * tb_connect_established fills info's ends once connected
 * (TB_NET_ESTABLISHED); tb_sock_is_mptcp says whether it is MPTCP. */
int tb_connect_info(struct socket *sock, void *uaddr, int addr_len,
		    struct tb_net_info *info);
int tb_connect_call(struct socket *sock, void *uaddr, int addr_len, int flags);
int tb_connect_hold(struct socket *sock);
void tb_connect_unhold(struct socket *sock);
void tb_connect_abandon(struct socket *sock);
void tb_connect_established(struct socket *sock, struct tb_net_info *info);
bool tb_sock_is_mptcp(const struct socket *sock);

/*
 * Accepts decided aside (T-37; logic in Rust: net.rs, proto/src/deferred.rs).
 * A non-blocking accept whose connection needs a verdict moves it to a
 * kernel socket of its own (tb_accept_hold), returns -EAGAIN and asks on a
 * worker (tb_accept_defer); an allowed one waits there until the next
 * accept on its listener gets it (tb_accept_give), a refused one is reset
 * (tb_accept_drop). The listener is woken (tb_sk_wake) and its poll()
 * reports it readable meanwhile.
 */
/* Moves newsock's connection to *held (a socket as kernel_accept makes),
 * leaving newsock empty for another accept. 0 or -errno (nothing moved).
 * Process context. */
int tb_accept_hold(struct socket *newsock, struct socket **held);
/* Moves held's connection to newsock (an accept's, empty) and frees held. */
void tb_accept_give(struct socket *held, struct socket *newsock);
/* Resets held's connection (no linger) and frees held. Process context. */
void tb_accept_drop(struct socket *held);
/* Runs trustbind_accept_run(job) on an unbound worker, holding a module
 * reference until it returned. 0, or -errno (not queued: the caller still
 * owns job). */
int tb_accept_defer(void *job);
/* Wakes the listener sk_id's waiters (sk_data_ready). Any context; the
 * caller holds a reference on it. */
void tb_sk_wake(unsigned long sk_id);
/* Implemented in Rust (net.rs): an accept on the user-space TCP (or,
 * mptcp, MPTCP) listener sock into newsock (arg: the accept's struct
 * proto_accept_arg), nonblocking when the program does not wait; its
 * result (0 or -errno). Process context, no lock held. */
int trustbind_accept(struct socket *sock, struct socket *newsock, void *arg,
		     bool nonblocking, bool mptcp);
/* The one-line calls trustbind_accept() makes: tb_accept_call is the
 * original accept; tb_accept_info fills info for newsock's connection if
 * the module watches it (1), else 0; tb_accept_refuse turns off linger so
 * the caller's release of newsock resets the connection; tb_sock_listening
 * whether sock is (still) a listener. */
int tb_accept_call(struct socket *sock, struct socket *newsock, void *arg,
		   bool mptcp);
int tb_accept_info(struct socket *newsock, struct tb_net_info *info);
void tb_accept_refuse(struct socket *newsock);
bool tb_sock_listening(const struct socket *sock);
/* The worker's half: asks, then makes the connection ready or resets it. */
void trustbind_accept_run(void *job);
/* Whether listener has a ready connection (its poll() reports EPOLLIN);
 * trustbind_accept_any() whether any listener has one. Any context but
 * hard interrupts. */
bool trustbind_accept_ready(unsigned long listener);
bool trustbind_accept_any(void);

/* Implemented in Rust (net.rs): the TCP socket sk_id (tb_sock_id) closed
 * (tcp_close() returned; the struct sock is still held, so the id cannot
 * be reused during the call), with its counters read after the close.
 * Process context, may take the device mutex; no spinlock held. */
void trustbind_net_closed(unsigned long sk_id,
			  const struct tb_tcp_counts *counts);

/* --- Netfilter backstop (helpers.c) ------------------------------------ */

#define TB_BACKSTOP_OFF 0	/* disabled mode, or connects not qualified */
#define TB_BACKSTOP_COUNT 1	/* permissive: count what would be dropped */
#define TB_BACKSTOP_DROP 2	/* enforce */

/* Sets what the backstop does (TB_BACKSTOP_*). Any context. */
void tb_backstop_set_mode(u32 mode);
/* The protected services and hosts the backstop reads are Rust's
 * (net.rs Backstop over proto/src/sorted.rs, published under RCU), and
 * so are the marks of the sockets the wrappers qualified (sys/mod.rs
 * over proto/src/marks.rs: lock-free, any context). */
#define TB_MARK_PLAIN 1	/* its verdict allows plaintext */
#define TB_MARK_CHANNEL 2	/* its verdict requires a channel (no key yet) */
#define TB_MARK_BOUND 3		/* its channel key is installed */
/* Whether the socket is a TCP one (not MPTCP: only those are marked). */
bool tb_sock_is_tcp(const struct socket *sock);
/* Whether the connection of sk_id (tb_sock_id-style, a reference held)
 * reached TCP_CLOSE. Any context. */
bool tb_sk_closed(unsigned long sk_id);
/* Implemented in Rust (sys/mod.rs): the mark of sk_id (TB_MARK_*, 0:
 * none). Any context; sk_id is only compared, never dereferenced. */
u32 trustbind_mark_of(unsigned long sk_id);
/* Implemented in Rust: tcp_close() of sk_id begins, the caller holding a
 * reference on it that it hands over. true: sk_id was marked, its mark now
 * owns that reference (until the connection reaches TCP_CLOSE: kick
 * tb_mark_gc); false: the caller still owns it. Process context. */
bool trustbind_mark_closing(unsigned long sk_id);
/* Implemented in Rust: the sweep of tb_mark_gc (its only caller, so never
 * two at once): removes the closing marks whose connection reached
 * TCP_CLOSE and puts their references. Whether closing marks remain. */
bool trustbind_mark_gc(void);
/* Implemented in Rust: removes every mark, putting the closing ones'
 * references (unload: no wrapper, close or sweep runs any more). */
void trustbind_mark_drain(void);
/* Implemented in Rust: marks now (debugfs net_backstop_marked). */
u64 trustbind_mark_count(void);
/* Adds the backstop's counters to the debugfs directory (may be NULL). */
struct dentry;
void tb_backstop_debugfs(struct dentry *dir);

struct sock;

/* One packet the backstop hooks saw, for proto::backstop (through Rust:
 * trustbind_backstop_out/_in); the hooks answer its lookups below. */
struct tb_bs_pkt {
	u64 net;		/* its network namespace's net_cookie */
	u32 mode;		/* TB_BACKSTOP_* */
	u8 family;		/* 4 or 6 */
	u8 syn;			/* SYN without ACK */
	u8 payload;		/* carries data */
	u8 loopback;		/* came in over loopback (incoming) */
	u8 saddr[16], daddr[16];
	u16 sport, dport;
	const struct sock *sk;	/* the skb's socket, or NULL (outgoing) */
};

#define TB_SENDER_UNQUALIFIABLE 0	/* no full TCP socket: raw, request */
#define TB_SENDER_KERNEL 1		/* a kernel socket, not an MPTCP subflow */
#define TB_SENDER_TCP 2			/* a user TCP socket or MPTCP subflow */

struct tb_bs_sender {
	u32 kind;		/* TB_SENDER_* */
	u8 tls_tx;		/* kTLS transmit state */
};

#define TB_BS_PASS 0
#define TB_BS_WOULD_DROP 1
#define TB_BS_DROP 2

/* Implemented in Rust (sys/mod.rs): the outcome (TB_BS_*) for p. Softirq
 * or process context, under netfilter's RCU read section. */
u32 trustbind_backstop_out(const struct tb_bs_pkt *p);
u32 trustbind_backstop_in(const struct tb_bs_pkt *p);
/* Whether any service is protected (the hooks parse nothing until one
 * is). Any context. */
bool trustbind_backstop_armed(void);
/* The lookup those make that stays in C (same context): p's sending
 * socket (what it is, its kTLS state; its mark is Rust's: p->sk). */
void tb_bs_sender(const struct tb_bs_pkt *p, struct tb_bs_sender *out);
/* An RCU read section, for Rust (sys/mod.rs RcuCell). */
void tb_rcu_read_lock(void);
void tb_rcu_read_unlock(void);

/* --- UNIX-domain connect qualification (ftrace IPMODIFY wrapper) ------- */

/*
 * unix_stream_connect() is static, but its address is in unix_stream_ops
 * and unix_seqpacket_ops, so it keeps its ENDBR and may be called
 * indirectly. At start a kernel AF_UNIX stream socket gives its address
 * (sock->ops->connect); an IPMODIFY op on that address redirects every
 * user-space call to a wrapper that calls the original through the saved
 * pointer. A second op on the exported security_unix_stream_connect()
 * (CONFIG_SECURITY_NETWORK) stops the original once the listener is found
 * and before anything is queued; the wrapper asks about that listener with
 * no lock held and, if allowed, runs the original again (helpers.c).
 */

/* One UNIX-domain connect, as trustbind_unix_check() sees it. */
struct tb_unix_info {
	u32 uid, euid, gid;	/* of the client, init userns */
	u32 loginuid;		/* (u32)-1 if unset */
	u32 sessionid;		/* (u32)-1 if unset */
	u32 tgid, ptgid;
	/* The server: the listener's owner (its SO_PEERCRED: tgid, and the
	 * euid/egid it listened with), or the acceptor (at_accept). peer_tgid
	 * 0: no such process any more. */
	u32 peer_tgid;
	u32 peer_uid, peer_gid;
	u32 peer_ptgid;
	u32 path_len;		/* bytes of path, no NUL */
	/* 0: asked at connect (the client is current, the server the
	 * listener's owner); 1: asked at accept by another process than the
	 * listener's owner (the server is current, the acceptor; the client
	 * is the connection's peer). */
	u32 at_accept;
	u64 start_ns;		/* boot-based start of the client's group leader */
	u64 pstart_ns;		/* same, of its parent's */
	u64 peer_start_ns;	/* same, of the listener's */
	u64 peer_pstart_ns;	/* same, of the listener's parent */
	/* The absolute path of a file-system socket, or the abstract name
	 * with its leading NUL byte (Rust shows it as '@' and the name, NUL
	 * bytes as '@'); not NUL-terminated. */
	u8 path[4096];
};

/* Registers the ops. 0 or -errno (nothing left registered). */
int tb_unix_hooks_start(void);
/* Unregisters them and waits until no task is inside a wrapper. */
void tb_unix_hooks_stop(void);
/* SHA-256 and SHA-1 of the executable of the process with thread group id
 * tgid whose group leader started at start_ns. 0 or -errno (-ESRCH: gone,
 * or the id was reused). */
int tb_hash_task_exe(struct tb_hashers *h, u32 tgid, u64 start_ns,
		     u8 *sha256_out, u8 *sha1_out);

/* One round of a UNIX stream/seqpacket connect: the kernel's own
 * unix_stream_connect(). Process context, sock the caller's. */
int tb_unix_connect_round(struct socket *sock, void *uaddr, int addr_len,
			  int flags);
/* Asks about the listener a round reached (held by the caller: a
 * tb_sock_id identity) for the current task: fills a tb_unix_info and
 * calls trustbind_unix_check(). 0 or -errno. May sleep. */
int tb_unix_ask(unsigned long listener);
/* Implemented in Rust (net.rs): a user-space UNIX stream/seqpacket connect
 * of sock to uaddr (a struct sockaddr) by the current task (thread group
 * tgid, task its identity), in rounds of tb_unix_connect_round(). Its
 * result. May sleep. */
int trustbind_unix_connect(struct socket *sock, void *uaddr, int addr_len,
			   int flags, u32 tgid, unsigned long task);
/* Implemented in Rust (net.rs), from security_unix_stream_connect() with
 * both sockets' state locks held: whether the connect of sk by task may
 * reach the listener other (true), or stops here to ask about it. Must
 * not sleep. */
bool trustbind_unix_reached(unsigned long sk, unsigned long task,
			    unsigned long other);
/* The process behind sk's SO_PEERCRED (a listener's: its owner, set at
 * listen()), init pid namespace; *tgid 0 when it is gone. */
void tb_sk_owner(unsigned long sk, u32 *tgid, u64 *start_ns);
/* Asks about the UNIX connection newsk that the current task accepted on
 * listener (both live, the caller's) as its server: fills a tb_unix_info
 * (at_accept) and calls trustbind_unix_check(). 0 or -errno. May sleep. */
int tb_unix_accept_ask(unsigned long listener, unsigned long newsk);
/* Implemented in Rust (net.rs), after unix_accept() accepted newsk on
 * listener for the current task (thread group tgid, its leader started
 * at start_ns): 0 keeps the connection, -errno fails the accept with that
 * error (the caller releases the new socket). May sleep. */
int trustbind_unix_accept(unsigned long listener, unsigned long newsk,
			  u32 tgid, u64 start_ns);
/* Implemented in Rust (net.rs), with the listener a connect reached and
 * before the connection exists: 0 lets it be made, -errno fails the
 * connect with that error. May sleep. */
int trustbind_unix_check(struct tb_unix_info *info);

/* --- Statistics in debugfs (/sys/kernel/debug/trustbind/) --------------- */

struct dentry;

/* Creates the directory; NULL when debugfs is unavailable (not an error). */
struct dentry *tb_debugfs_dir(void);
/* A read-only file showing *value (a u64 the module updates atomically). */
void tb_debugfs_u64(struct dentry *dir, const char *name, u64 *value);
/* Removes the directory and its files; NULL is allowed. */
void tb_debugfs_remove(struct dentry *dir);

/* --- Module pinning ------------------------------------------------------ */

/* Takes (pin) or drops (unpin) a reference on this module, so that rmmod
 * fails with EBUSY while it is held. */
bool tb_module_pin(void);
void tb_module_unpin(void);

/* --- /dev/trustbind (misc device) -------------------------------------- */

/* Registers /dev/trustbind (mode 0600). 0 or -errno. */
int tb_dev_register(void);
void tb_dev_deregister(void);
/* Wakes readers and pollers after a record was queued for the agent. */
void tb_dev_wake_readers(void);

/*
 * Implemented in Rust (device.rs), called by the file operations in
 * helpers.c. Read returns -EAGAIN when nothing is queued; helpers.c then
 * sleeps (or returns -EAGAIN to an O_NONBLOCK reader).
 */
int trustbind_dev_open(u32 tgid);
void trustbind_dev_release(void);
ssize_t trustbind_dev_read(unsigned long ubuf, size_t len);
ssize_t trustbind_dev_write(unsigned long ubuf, size_t len);
bool trustbind_dev_readable(void);

/* --- Process and time ----------------------------------------------------- */

/* Identity of a file, as the verdict cache and the agent pin compare it. */
struct tb_file_id {
	u64 dev;
	u64 ino;
	u64 change_cookie;	/* valid if has_change_cookie */
	u32 generation;
	u32 has_change_cookie;
};

/* The identity of the current task's executable (mm->exe_file). 0 or -errno. */
int tb_current_exe_id(struct tb_file_id *out);
/* The `mode` and `agent` module parameters (never NULL; "" when unset). */
const char *tb_param_mode(void);
const char *tb_param_agent(void);
const char *tb_param_authority(void);

/* --- Sealed records and tickets (key agreement, HMAC-SHA256, GCM) ------- */

struct crypto_shash;
/* Ephemeral P-256 pair: public key (x||y, 64 bytes) and the ECDH secret
 * (32 bytes) with peer (x||y). 0 or -errno. */
int tb_ecdh_p256(const u8 *peer, u8 *pub_out, u8 *secret_out);
/* A keyed "hmac(sha256)" transform into *out. 0 or -errno. */
int tb_hmac_new(const u8 *key, unsigned int keylen, struct crypto_shash **out);
void tb_hmac_free(struct crypto_shash *tfm);
/* HMAC-SHA256 of the concatenation of the n parts (parts[i], lens[i]
 * bytes) into out[32]. 0 or -errno. */
int tb_hmacv(struct crypto_shash *tfm, const u8 *const *parts,
	     const size_t *lens, unsigned int n, u8 *out);
/* AES-256-GCM: opens ct (ct_len bytes) with its 16-byte tag under key (32
 * bytes), the 12-byte nonce and aad, into out (ct_len bytes). -EBADMSG
 * when the tag does not match (out is then zeroed). Process context: it
 * allocates and may sleep. */
int tb_gcm_open(const u8 *key, const u8 *nonce, const u8 *aad,
		unsigned int aad_len, const u8 *ct, unsigned int ct_len,
		const u8 *tag, u8 *out);
/* SHA-256 of data into out[32]. */
void tb_sha256(const u8 *data, size_t len, u8 *out);
/* Constant time: whether the n bytes differ. */
bool tb_memneq(const u8 *a, const u8 *b, size_t n);
/* Zeroes n bytes (never optimised away). */
void tb_wipe(u8 *p, size_t n);
/* Publishes the mode in force (0 disabled, 1 permissive, 2 enforce) as the
 * read-only parameter /sys/module/trustbind/parameters/current_mode. */
void tb_publish_mode(u8 mode);
/* Identity of the regular file at the absolute path name. 0 or -errno. */
int tb_file_id_of(const char *name, struct tb_file_id *out);

/* Milliseconds since boot (jiffies resolution), for cache ages. */
u64 tb_now_ms(void);
/* set_user_nice(current, nice); nice is clamped to -20..19 by the caller. */
void tb_set_nice_current(int nice);
/* Whether a log line may be printed now (one shared rate limit). */
bool tb_log_ratelimit(void);

#endif /* TRUSTBIND_HELPERS_H */

/* --- File gate ------------------------------------------------------------ */

/*
 * One file operation as the gate's hooks see it. The hooks run under VFS
 * locks or with preemption disabled: the Rust side answers from what it
 * knows (protected set, cache, answers) and never sleeps there.
 */
enum {
	TB_FOP_OPEN = 1,	/* d: the opened file */
	TB_FOP_NEW = 2,		/* d: the new (negative) name; its parent decides */
	TB_FOP_DELETE = 3,	/* d: the name removed */
	TB_FOP_RENAME = 4,	/* d: the old name, d2: the new name */
	TB_FOP_LINK = 5,	/* d: the linked file, d2: the new name */
	TB_FOP_TRUNCATE = 6,	/* d: the file truncated */
};

/* What trustbind_file_gate() says. */
enum {
	TB_GATE_PASS = 0,	/* let the operation go on */
	TB_GATE_ASK = 1,	/* ask from a task work, restart the call */
};

struct tb_file_op {
	u32 op;			/* TB_FOP_* */
	u32 write;		/* TB_FOP_OPEN: opened for writing */
	u32 trunc;		/* TB_FOP_OPEN: O_TRUNC */
	struct dentry *d;
	struct dentry *d2;
};

/* The calling task's ids, in the init user namespace. */
struct tb_task_ids {
	u32 uid, euid, gid;
	u32 loginuid;		/* (u32)-1 if unset */
	u32 sessionid;		/* (u32)-1 if unset */
	u32 tgid, ptgid, pid;
	u64 start_ns, pstart_ns;
};
void tb_current_ids(struct tb_task_ids *out);

/* The identity of d's inode (of its parent's, if parent): its device as
 * stat(2) reports it (st_dev encoding; on btrfs its subvolume's, T-98),
 * its super block's device (st_dev encoding: the one /proc/self/mountinfo
 * shows), inode number, inode generation. False for a negative dentry.
 * Any context. */
bool tb_dentry_ident(const struct dentry *d, bool parent, u64 *dev,
		     u64 *fs_dev, u64 *ino, u32 *gen);
/* The device stat(2) reports for every inode of d's file system (st_dev
 * encoding), or 0 if it varies (btrfs: each subvolume has its own). */
u64 tb_dentry_dev(const struct dentry *d);
/* The identity of the file at path (absolute, NUL-terminated) as init
 * (pid 1) names it: walked from init's root in init's mount namespace,
 * every symlink followed (LOOKUP_FOLLOW). *dev as stat(2) reports it
 * (st_dev encoding), *ino its inode number, *dir whether it is a
 * directory. 0 or -errno. Sleeps: call with no lock held. */
int tb_init_path_ident(const char *path, u64 *dev, u64 *ino, bool *dir);
/* Init's mount table: /proc/1/mountinfo, opened from init's root, into
 * buf. The length, -E2BIG if it does not fit in len, or -errno. Sleeps:
 * call with no lock held. */
ssize_t tb_init_mountinfo(char *buf, size_t len);
/* The inode numbers of d (if from_parent is false) and of every dentry
 * above it on its file system, nearest first, at most max; the count, or
 * max + 1 if the tree goes deeper. With devs, also each one's device as
 * stat(2) reports it (st_dev encoding). A consistent snapshot
 * (rename_lock retried); with tree, the version of the dentry tree it
 * saw (rename_lock's sequence). Any context. */
int tb_dentry_chain(const struct dentry *d, bool from_parent, u64 *inos,
		    u64 *devs, int max, u32 *tree);
/* Where d (or, from_parent, its directory) sits: its inode number, its
 * parent's, both generations (d's in the high half of *gens) and the
 * dentry tree's version (rename_lock's sequence), read as one snapshot.
 * False where the gate does not remember places: a negative dentry, a
 * file system's root or a disconnected dentry, and file systems whose
 * directories can change without this kernel's hooks seeing it (those
 * with no block device but tmpfs: network file systems, FUSE). Any
 * context. */
bool tb_dentry_place(const struct dentry *d, bool from_parent, u64 *ino,
		     u64 *parent_ino, u64 *gens, u32 *tree);

/* Rust: a directory is being removed (its inode number may come back
 * elsewhere). Any context, kernel threads' calls included; never
 * sleeps. */
void trustbind_file_dir_removed(void);
/* The path of d from the root of its file system into buf (at most len
 * bytes); *out points at it, the length is returned, or -errno. */
int tb_dentry_path(const struct dentry *d, char *buf, int len,
		   const char **out);

/* Rust: the gate's decision (TB_GATE_PASS, TB_GATE_ASK or -errno). Any
 * context; never sleeps. */
int trustbind_file_gate(const struct tb_file_op *op);
/* Rust: an operation the gate wanted asked could not be (no memory, the
 * task is exiting): 0 or -errno, by mode. */
int trustbind_file_unasked(const struct tb_file_op *op);
/* Rust: asks about op from the task work (process context, no lock held,
 * may sleep). */
void trustbind_file_ask(const struct tb_file_op *op);

/* Implemented in Rust (net.rs): whether enforce mode refuses a user
 * socket of this family and protocol (0, or -EACCES). Any context: never
 * sleeps. */
int trustbind_socket_create(int family, int protocol);

int tb_file_hooks_start(void);
void tb_file_hooks_stop(void);
