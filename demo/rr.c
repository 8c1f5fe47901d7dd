/*
 * rr: a 1-byte TCP request/response test in the manner of netperf TCP_RR.
 *
 *   rr -s -p PORT                 serve one connection: echo each byte back, exit at EOF
 *   rr -c IP -p PORT -t SECONDS   ping-pong for SECONDS, print one JSON line
 *
 * Blocking read/write on one connection with TCP_NODELAY, one transaction in flight: the
 * rate is 1 / round-trip time, so it measures the per-packet cost of the path in both
 * directions, which throughput (big GSO packets) hides. Node's event loop would add more
 * per transaction than the path itself, hence C.
 *
 * Latencies go into 100 ns buckets up to 50 ms (one overflow bucket above): percentiles
 * are exact to 0.1 us without storing every sample.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUCKET_NS 100
#define NBUCKETS 500000

static uint32_t hist[NBUCKETS + 1];

static uint64_t now_ns(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
	fprintf(stderr, "rr: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void nodelay(int fd) {
	int one = 1;
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) die("TCP_NODELAY");
}

/* A short read or write of one byte is either the byte or the end. */
static int one_byte(int fd, int writing) {
	char b = 'x';
	for (;;) {
		ssize_t n = writing ? write(fd, &b, 1) : read(fd, &b, 1);
		if (n == 1) return 1;
		if (n == 0) return 0;
		if (errno != EINTR) return -1;
	}
}

static int serve(int port) {
	int ls = socket(AF_INET, SOCK_STREAM, 0);
	if (ls < 0) die("socket");
	int one = 1;
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY) };
	if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
	if (listen(ls, 1) < 0) die("listen");
	/* The parent waits for this line before it starts the client. */
	printf("listening %d\n", port);
	fflush(stdout);
	int fd = accept(ls, NULL, NULL);
	if (fd < 0) die("accept");
	close(ls);
	nodelay(fd);
	for (;;) {
		int r = one_byte(fd, 0);
		if (r == 0) break;
		if (r < 0 || one_byte(fd, 1) < 0) die("echo");
	}
	close(fd);
	return 0;
}

static double percentile_us(uint64_t total, double p) {
	uint64_t rank = (uint64_t)(p * (double)(total - 1)) + 1, seen = 0;
	for (int i = 0; i <= NBUCKETS; i++) {
		seen += hist[i];
		if (seen >= rank) return (i + 0.5) * BUCKET_NS / 1000.0;
	}
	return NBUCKETS * BUCKET_NS / 1000.0;
}

static int client(const char *ip, int port, double seconds) {
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0) die("socket");
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
		fprintf(stderr, "rr: bad address %s\n", ip);
		return 2;
	}
	if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
	nodelay(fd);
	/* The first transactions pay for cold caches and the scheduler settling: not counted. */
	uint64_t warm = seconds >= 2 ? 200000000ull : 50000000ull;
	uint64_t start = now_ns(), end_warm = start + warm, end = end_warm + (uint64_t)(seconds * 1e9);
	uint64_t t = start, n = 0, measured_from = 0;
	while (t < end) {
		uint64_t t0 = t;
		if (one_byte(fd, 1) != 1 || one_byte(fd, 0) != 1) die("ping-pong");
		t = now_ns();
		if (t0 < end_warm) continue;
		if (!measured_from) measured_from = t0;
		uint64_t b = (t - t0) / BUCKET_NS;
		hist[b < NBUCKETS ? b : NBUCKETS]++;
		n++;
	}
	shutdown(fd, SHUT_WR);
	close(fd);
	if (!n) {
		fprintf(stderr, "rr: no transaction completed\n");
		return 2;
	}
	double secs = (double)(t - measured_from) / 1e9;
	printf("{\"transactions\":%llu,\"seconds\":%.6f,\"tps\":%.1f,\"p50_us\":%.2f,\"p99_us\":%.2f}\n",
	       (unsigned long long)n, secs, (double)n / secs, percentile_us(n, 0.50), percentile_us(n, 0.99));
	return 0;
}

int main(int argc, char **argv) {
	int server = 0, port = 0, opt;
	const char *ip = NULL;
	double seconds = 5;
	while ((opt = getopt(argc, argv, "sc:p:t:")) != -1) {
		switch (opt) {
		case 's': server = 1; break;
		case 'c': ip = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 't': seconds = atof(optarg); break;
		default: goto usage;
		}
	}
	if (port <= 0 || port > 65535 || server == !!ip || seconds <= 0) goto usage;
	return server ? serve(port) : client(ip, port, seconds);
usage:
	fprintf(stderr, "usage: rr -s -p PORT | rr -c IP -p PORT [-t SECONDS]\n");
	return 2;
}
