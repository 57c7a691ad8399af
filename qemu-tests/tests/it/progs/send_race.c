// SPDX-License-Identifier: GPL-2.0
/*
 * send_race PORT ROUNDS: a send racing the connect of its socket (docs/
 * THREAT-MODEL.md, T-40), for qemu-tests/tests/it/net_channel.rs.
 *
 * Each round, on one fresh TCP socket shared by three processes:
 *  - a hog keeps the socket lock busy: setsockopt(SO_ATTACH_FILTER) of a
 *    4096-instruction filter in a loop (the kernel checks, converts and
 *    compiles it with the socket locked);
 *  - a sender calls send("race-ROUND-CANARY\n") in a loop from before the
 *    connect until one succeeds; most calls enter tcp_sendmsg() and then
 *    wait for the socket lock, so many enter before the connect holds the
 *    socket's sends and take the lock after its SYN went out;
 *  - this process connects to 127.0.0.1:PORT (a bound channel).
 * A send that entered before the hold and ran after the SYN is what the
 * hold at tcp_sendmsg()'s entry let through: it waited for the handshake
 * and went out in plaintext before the key was installed.
 *
 * Exit status: 0 when every round's sender reported a successful send;
 * 20 + errno if a connect failed; 3 if a sender never got through; 2 on a
 * setup error.
 */
typedef unsigned long u64;

#define SYS_write 1
#define SYS_close 3
#define SYS_socket 41
#define SYS_connect 42
#define SYS_sendto 44
#define SYS_setsockopt 54
#define SYS_fork 57
#define SYS_exit 60
#define SYS_wait4 61
#define SYS_kill 62
#define SYS_nanosleep 35

#define AF_INET 2
#define SOCK_STREAM 1
#define SOL_SOCKET 1
#define SO_ATTACH_FILTER 26
#define MSG_NOSIGNAL 0x4000
#define SIGKILL 9
#define EINTR 4

static long sc(long n, long a, long b, long c, long d, long e)
{
	long r;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;

	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return r;
}

static __attribute__((noreturn)) void die(int code)
{
	sc(SYS_exit, code, 0, 0, 0, 0);
	for (;;)
		;
}

struct sock_filter {
	unsigned short code;
	unsigned char jt, jf;
	unsigned int k;
};

struct sock_fprog {
	unsigned short len;
	struct sock_filter *filter;
};

#define FILTER_LEN 4096
static struct sock_filter filter[FILTER_LEN];

static unsigned long parse(const char *s)
{
	unsigned long n = 0;

	while (*s >= '0' && *s <= '9')
		n = n * 10 + (unsigned long)(*s++ - '0');
	return n;
}

/* "race-ROUND-TRUSTBIND-PLAINTEXT-CANARY\n" into buf; its length. */
static long line(char *buf, unsigned long round)
{
	static const char head[] = "race-", tail[] = "-TRUSTBIND-PLAINTEXT-CANARY\n";
	char digits[20];
	long n = 0, d = 0, i;

	for (i = 0; head[i]; i++)
		buf[n++] = head[i];
	do {
		digits[d++] = (char)('0' + round % 10);
		round /= 10;
	} while (round);
	while (d)
		buf[n++] = digits[--d];
	for (i = 0; tail[i]; i++)
		buf[n++] = tail[i];
	return n;
}

static void hog(long fd)
{
	struct sock_fprog prog = { FILTER_LEN, filter };

	for (;;)
		sc(SYS_setsockopt, fd, SOL_SOCKET, SO_ATTACH_FILTER, (long)&prog,
		   sizeof(prog));
}

static void sender(long fd, unsigned long round)
{
	char buf[64];
	long n = line(buf, round);
	unsigned long tries;

	/* EPIPE until the connect went out; then held, then sent. */
	for (tries = 0; tries < 50000000UL; tries++)
		if (sc(SYS_sendto, fd, (long)buf, n, MSG_NOSIGNAL, 0) == n)
			die(0);
	die(3);
}

static long reap(long pid)
{
	int status = 0;
	long r;

	do
		r = sc(SYS_wait4, pid, (long)&status, 0, 0, 0);
	while (r == -EINTR);
	return r < 0 ? r : status;
}

void cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	struct {
		unsigned short family, port;
		unsigned int addr;
		unsigned char zero[8];
	} sa = { AF_INET, 0, 0x0100007f, { 0 } };
	unsigned long port, rounds, r;
	struct {
		long sec, nsec;
	} pause = { 0, 500000000 };
	long i;

	if (argc != 3)
		die(2);
	port = parse(argv[1]);
	rounds = parse(argv[2]);
	sa.port = (unsigned short)(((port & 0xff) << 8) | (port >> 8));
	/* ld [0] ... ld [0], ret #0xffff: accepted, and long to check. */
	for (i = 0; i < FILTER_LEN - 1; i++) {
		filter[i].code = 0x20; /* BPF_LD | BPF_W | BPF_ABS */
		filter[i].k = 0;
	}
	filter[FILTER_LEN - 1].code = 0x06; /* BPF_RET | BPF_K */
	filter[FILTER_LEN - 1].k = 0xffff;

	for (r = 1; r <= rounds; r++) {
		long fd = sc(SYS_socket, AF_INET, SOCK_STREAM, 0, 0, 0);
		long hog_pid, send_pid, err, st;

		if (fd < 0)
			die(2);
		hog_pid = sc(SYS_fork, 0, 0, 0, 0, 0);
		if (hog_pid == 0)
			hog(fd);
		send_pid = sc(SYS_fork, 0, 0, 0, 0, 0);
		if (send_pid == 0)
			sender(fd, r);
		if (hog_pid < 0 || send_pid < 0)
			die(2);
		err = sc(SYS_connect, fd, (long)&sa, sizeof(sa), 0, 0);
		st = reap(send_pid);
		sc(SYS_kill, hog_pid, SIGKILL, 0, 0, 0);
		reap(hog_pid);
		/* Let the server accept before the FIN: kTLS attaches only to
		 * an ESTABLISHED socket, so an accept that finds the client's
		 * FIN already there cannot be keyed (reset; see T-37). */
		sc(SYS_nanosleep, (long)&pause, 0, 0, 0, 0);
		sc(SYS_close, fd, 0, 0, 0, 0);
		if (err < 0)
			die(20 + (int)-err);
		if (st != 0)
			die(3);
	}
	die(0);
}

__asm__(".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call cmain\n"
	"	hlt\n");
