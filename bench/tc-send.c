// SPDX-License-Identifier: GPL-2.0
/*
 * bench/tc-send: sends COUNT copies of one 64-byte Ethernet/IPv4/UDP frame
 * out of DEV through an AF_PACKET socket, BATCH per sendmmsg, and prints the
 * nanoseconds per frame of the thread's CPU time, then of the wall clock. Each frame crosses DEV's TC egress hook
 * in dev_queue_xmit and, DEV being a veth, its peer's TC ingress hook in the
 * receive softirq that the send itself runs on the same CPU (bench/tc.ts
 * pins it). The frame's destination MAC is no device's, so the peer's IP
 * layer drops it first thing: what remains is the hooks' cost. CPU time
 * leaves out the time other tasks had the CPU (a shared machine); it holds
 * the softirq work run in this thread's context on a kernel without
 * CONFIG_IRQ_TIME_ACCOUNTING, which bench/tc.ts checks.
 *
 *   tc-send DEV COUNT BATCH
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FRAME 64
#define MAX_BATCH 1024

static uint16_t ip_checksum(const uint8_t *h, int len)
{
	uint32_t s = 0;
	for (int i = 0; i < len; i += 2)
		s += (uint32_t)h[i] << 8 | h[i + 1];
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (uint16_t)~s;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s DEV COUNT BATCH\n", argv[0]);
		return 2;
	}
	unsigned ifindex = if_nametoindex(argv[1]);
	long count = atol(argv[2]);
	int batch = atoi(argv[3]);
	if (!ifindex || count <= 0 || batch <= 0 || batch > MAX_BATCH) {
		fprintf(stderr, "tc-send: bad arguments (device %s: ifindex %u, count %ld, batch %d, at most %d)\n", argv[1], ifindex, count, batch, MAX_BATCH);
		return 2;
	}
	int fd = socket(AF_PACKET, SOCK_RAW, 0);
	if (fd < 0) {
		perror("tc-send: socket(AF_PACKET)");
		return 1;
	}
	struct sockaddr_ll to = { .sll_family = AF_PACKET, .sll_ifindex = (int)ifindex, .sll_halen = ETH_ALEN };

	uint8_t f[FRAME] = { 0 };
	const uint8_t dst[6] = { 0x02, 0, 0, 0, 0xbe, 0x01 }, src[6] = { 0x02, 0, 0, 0, 0xbe, 0x02 };
	memcpy(f, dst, 6);
	memcpy(f + 6, src, 6);
	f[12] = 0x08; /* IPv4 */
	uint8_t *ip = f + 14;
	ip[0] = 0x45;
	ip[3] = FRAME - 14; /* total length */
	ip[8] = 64;         /* TTL */
	ip[9] = 17;         /* UDP */
	memcpy(ip + 12, (uint8_t[]){ 192, 0, 2, 1 }, 4);
	memcpy(ip + 16, (uint8_t[]){ 192, 0, 2, 2 }, 4);
	uint16_t c = ip_checksum(ip, 20);
	ip[10] = c >> 8;
	ip[11] = c & 0xff;
	uint8_t *udp = ip + 20;
	udp[0] = 0x9c; udp[1] = 0x40; /* 40000 */
	udp[2] = 0x23; udp[3] = 0x28; /* 9000: no tunnel port */
	udp[5] = FRAME - 34;          /* UDP length; checksum 0: none */

	static struct iovec iov[MAX_BATCH];
	static struct mmsghdr m[MAX_BATCH];
	for (int i = 0; i < batch; i++) {
		iov[i] = (struct iovec){ .iov_base = f, .iov_len = FRAME };
		m[i].msg_hdr = (struct msghdr){ .msg_name = &to, .msg_namelen = sizeof(to), .msg_iov = &iov[i], .msg_iovlen = 1 };
	}

	struct timespec t0, t1, c0, c1;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	long sent = 0;
	while (sent < count) {
		int n = (int)(count - sent < batch ? count - sent : batch);
		int r = sendmmsg(fd, m, (unsigned)n, 0);
		if (r < 0) {
			if (errno == ENOBUFS || errno == EAGAIN)
				continue;
			perror("tc-send: sendmmsg");
			return 1;
		}
		sent += r;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
	double wall = (double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec);
	double cpu = (double)(c1.tv_sec - c0.tv_sec) * 1e9 + (double)(c1.tv_nsec - c0.tv_nsec);
	printf("%.2f %.2f\n", cpu / (double)sent, wall / (double)sent);
	close(fd);
	return 0;
}
