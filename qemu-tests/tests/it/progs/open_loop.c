// SPDX-License-Identifier: GPL-2.0
/*
 * open_loop N PATH: opens PATH read-only and closes it N times, for the
 * file gate's benchmark (qemu-tests/tests/it/bench.rs `bench_file_open`).
 * With PATH `-`, makes N getppid() calls instead (the benchmark's
 * control: a system call none of the module's hooks sees).
 * Freestanding (raw system calls, no libc), so the loop is nothing but
 * the two calls. Exit status 0, or 1 if an open failed.
 */
static inline __attribute__((always_inline)) long sc3(long n, long a, long b, long c)
{
	long r;

	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}

enum { SYS_close = 3, SYS_getppid = 110, SYS_exit_group = 231, SYS_openat = 257, AT_FDCWD = -100 };

static long parse(const char *s)
{
	long n = 0;

	while (*s >= '0' && *s <= '9')
		n = n * 10 + (*s++ - '0');
	return n;
}

__attribute__((noreturn, used)) void start_c(long *sp)
{
	char **argv = (char **)(sp + 1);
	long n = sp[0] > 2 ? parse(argv[1]) : 0, i, fd;
	int status = sp[0] > 2 ? 0 : 2;

	if (n && argv[2][0] == '-' && !argv[2][1]) {
		for (i = 0; i < n; i++)
			sc3(SYS_getppid, 0, 0, 0);
		n = 0;
	}
	for (i = 0; i < n; i++) {
		fd = sc3(SYS_openat, AT_FDCWD, (long)argv[2], 0);
		if (fd < 0) {
			status = 1;
			break;
		}
		sc3(SYS_close, fd, 0, 0);
	}
	sc3(SYS_exit_group, status, 0, 0);
	__builtin_unreachable();
}

__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall start_c\n");
