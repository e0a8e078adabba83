/* bench/loadgen/loadgen.c: the bench's load generator and server, small enough that the
 * kernel path, not the client, is what a run measures. One binary, subcommands:
 *
 *   loadgen server     --port P [--port P ...] [--bind ADDR] [--threads T]
 *   loadgen tcp_crr    --addr A --port P --duration S [--threads T] [--warmup S] [--timeout S]
 *                      [--rate N]  at most N connections a second (all threads)
 *   loadgen tcp_rr     (same options)  one kept connection per thread, 1-byte request/response
 *   loadgen udp_rr     (same options) [--connected]  one socket per thread (netperf UDP_RR)
 *   loadgen udp_crr    (same options) [--connected]  a new socket per request (a DNS client)
 *   loadgen tcp_stream (same options)  one connection per thread: 'S', then 64 KiB writes
 *   loadgen udp_flood  --addr A --port P --duration S [--flows N] [--rate PPS] [--size B]
 *                      one-way small datagrams from N sockets (N source ports, N flows) by
 *                      sendmmsg, as fast as it can or paced at PPS; counts what it sent (the
 *                      receiver counts what arrived: a packet-rate benchmark's sender)
 *
 * A client prints one JSON line and exits 0 once warmup + duration (+ at most one --timeout
 * for the transactions in flight) have passed; errors are counted by errno name, never fatal.
 * Build: gcc -O2 -Wall -Wextra -o loadgen loadgen.c -lpthread (Linux: epoll, SO_REUSEPORT). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 64
#define MAX_THREADS 256
#define BULK_SIZE (64 * 1024)
#define MAX_FLOWS 1024
#define FLOOD_BATCH 32 /* datagrams per sendmmsg: the syscall is paid once per batch */

static void die(const char *what)
{
	fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(const char *why)
{
	fprintf(stderr,
		"loadgen: %s\n"
		"usage: loadgen server --port P [--port P ...] [--bind ADDR] [--threads T]\n"
		"       loadgen tcp_crr|tcp_rr|udp_rr|udp_crr|tcp_stream --addr A --port P\n"
		"               --duration S [--threads T] [--warmup S] [--timeout S] [--connected]\n"
		"               [--rate N]   (tcp_crr: at most N connections a second in all)\n"
		"       loadgen udp_flood --addr A --port P --duration S [--flows N] [--rate PPS]\n"
		"               [--size B]\n",
		why);
	exit(2);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* -- addresses ------------------------------------------------------------------------- */

struct address {
	struct sockaddr_storage sa;
	socklen_t len;
	int family;
};

static bool parse_address(const char *text, int port, struct address *out)
{
	memset(out, 0, sizeof(*out));
	struct sockaddr_in *v4 = (struct sockaddr_in *)&out->sa;
	struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&out->sa;
	if (inet_pton(AF_INET, text, &v4->sin_addr) == 1) {
		v4->sin_family = AF_INET;
		v4->sin_port = htons((uint16_t)port);
		out->len = sizeof(*v4);
	} else if (inet_pton(AF_INET6, text, &v6->sin6_addr) == 1) {
		v6->sin6_family = AF_INET6;
		v6->sin6_port = htons((uint16_t)port);
		out->len = sizeof(*v6);
	} else {
		return false;
	}
	out->family = out->sa.ss_family;
	return true;
}

static bool same_address(const struct address *a, const struct sockaddr_storage *b)
{
	if (a->family != b->ss_family)
		return false;
	if (a->family == AF_INET) {
		const struct sockaddr_in *x = (const void *)&a->sa, *y = (const void *)b;
		return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
	}
	const struct sockaddr_in6 *x = (const void *)&a->sa, *y = (const void *)b;
	return x->sin6_port == y->sin6_port &&
	       memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
}

static void set_int(int fd, int level, int name, int value)
{
	if (setsockopt(fd, level, name, &value, sizeof(value)) < 0)
		die("setsockopt");
}

/* Raise the open-file limit to its hard limit: a server may hold many connections. */
static rlim_t raise_nofile(void)
{
	struct rlimit lim;
	if (getrlimit(RLIMIT_NOFILE, &lim) < 0)
		die("getrlimit");
	lim.rlim_cur = lim.rlim_max;
	setrlimit(RLIMIT_NOFILE, &lim);
	getrlimit(RLIMIT_NOFILE, &lim);
	return lim.rlim_cur;
}

/* -- server ---------------------------------------------------------------------------- */

enum { EV_WAKE = 1, EV_LISTEN, EV_UDP, EV_CONN };
enum { CONN_NEW = 0, CONN_RR, CONN_SINK };

/* Per-fd state of accepted connections (fds are process-wide; each is one worker's). */
static unsigned char *conn_state;
static size_t conn_state_size;

struct server_worker {
	pthread_t thread;
	int epoll;
	int fds[2 * MAX_PORTS];
	int nfds;
};

static int server_socket(const struct address *bind_to, int type)
{
	int fd = socket(bind_to->family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket");
	set_int(fd, SOL_SOCKET, SO_REUSEADDR, 1);
	/* One listener and one UDP socket per worker and port: the kernel spreads connections
	 * and datagrams over the workers by flow hash, with no shared accept queue or lock. */
	set_int(fd, SOL_SOCKET, SO_REUSEPORT, 1);
	if (bind_to->family == AF_INET6)
		set_int(fd, IPPROTO_IPV6, IPV6_V6ONLY, 0);
	if (bind(fd, (const struct sockaddr *)&bind_to->sa, bind_to->len) < 0) {
		char what[128];
		snprintf(what, sizeof(what), "bind %s port %d",
			 type == SOCK_STREAM ? "tcp" : "udp",
			 ntohs(((const struct sockaddr_in *)&bind_to->sa)->sin_port));
		die(what);
	}
	if (type == SOCK_STREAM) {
		/* Accepted sockets inherit it: responses are never held back by Nagle. */
		set_int(fd, IPPROTO_TCP, TCP_NODELAY, 1);
		if (listen(fd, SOMAXCONN) < 0) /* the kernel caps it at net.core.somaxconn */
			die("listen");
	}
	return fd;
}

/* SO_REUSEPORT lets a second server of the same user join our ports and silently take half
 * the traffic (a leftover from an earlier run, say). Bind each port once without it first,
 * so a port in use fails the start-up instead. TCP keeps SO_REUSEADDR (TIME_WAIT leftovers
 * are fine; it never allows sharing a listener); UDP must not have it (it would share). */
static void check_port_free(const struct address *at, int type)
{
	int fd = socket(at->family, type | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket");
	if (type == SOCK_STREAM)
		set_int(fd, SOL_SOCKET, SO_REUSEADDR, 1);
	if (at->family == AF_INET6)
		set_int(fd, IPPROTO_IPV6, IPV6_V6ONLY, 0);
	if (bind(fd, (const struct sockaddr *)&at->sa, at->len) < 0) {
		char what[128];
		snprintf(what, sizeof(what), "%s port %d", type == SOCK_STREAM ? "tcp" : "udp",
			 ntohs(((const struct sockaddr_in *)&at->sa)->sin_port));
		die(what);
	}
	close(fd);
}

static void watch(int epoll, int fd, uint32_t kind)
{
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)kind << 32) | (uint32_t)fd};
	if (epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &ev) < 0)
		die("epoll_ctl");
}

static void serve_accept(int epoll, int listener)
{
	for (;;) {
		int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return; /* EAGAIN, or a connection reset before we got to it, or EMFILE */
		if ((size_t)fd >= conn_state_size) {
			close(fd);
			continue;
		}
		conn_state[fd] = CONN_NEW;
		watch(epoll, fd, EV_CONN);
	}
}

/* One byte answers each request byte; a connection whose first byte is 'S' is a sink. */
static void serve_conn(int fd, char *buf)
{
	ssize_t n = recv(fd, buf, BULK_SIZE, 0);
	if (n <= 0) {
		if (n == 0 || (errno != EAGAIN && errno != EINTR))
			close(fd); /* peer closed; ECONNRESET when it closed with linger 0 */
		return;
	}
	if (conn_state[fd] == CONN_NEW)
		conn_state[fd] = buf[0] == 'S' ? CONN_SINK : CONN_RR;
	if (conn_state[fd] == CONN_RR)
		send(fd, buf, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
}

static void serve_udp(int fd, char *buf)
{
	for (int i = 0; i < 64; i++) { /* then let the other sockets have a turn */
		struct sockaddr_storage from;
		socklen_t len = sizeof(from);
		ssize_t n = recvfrom(fd, buf, BULK_SIZE, MSG_DONTWAIT, (struct sockaddr *)&from, &len);
		if (n < 0)
			return;
		sendto(fd, buf, (size_t)n, MSG_DONTWAIT, (struct sockaddr *)&from, len);
	}
}

static void *server_run(void *arg)
{
	struct server_worker *w = arg;
	static __thread char buf[BULK_SIZE];
	struct epoll_event events[256];
	for (;;) {
		int n = epoll_wait(w->epoll, events, 256, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int i = 0; i < n; i++) {
			int fd = (int)(uint32_t)events[i].data.u64;
			switch (events[i].data.u64 >> 32) {
			case EV_WAKE:
				return NULL;
			case EV_LISTEN:
				serve_accept(w->epoll, fd);
				break;
			case EV_UDP:
				serve_udp(fd, buf);
				break;
			case EV_CONN:
				serve_conn(fd, buf);
				break;
			}
		}
	}
}

static int cmd_server(int ports[], int nports, const char *bind_text, int nthreads)
{
	if (nports == 0)
		usage("server: give at least one --port");
	for (int p = 0; p < nports; p++)
		for (int q = 0; q < p; q++)
			if (ports[p] == ports[q])
				usage("server: a --port is given twice");
	rlim_t nofile = raise_nofile();
	conn_state_size = nofile > (1u << 22) ? (1u << 22) : (size_t)nofile;
	conn_state = calloc(conn_state_size, 1);
	if (!conn_state)
		die("calloc");

	/* SIGTERM/SIGINT are taken by sigwait() in the main thread only. */
	sigset_t stop;
	sigemptyset(&stop);
	sigaddset(&stop, SIGTERM);
	sigaddset(&stop, SIGINT);
	pthread_sigmask(SIG_BLOCK, &stop, NULL);

	int wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (wake < 0)
		die("eventfd");
	struct server_worker *workers = calloc((size_t)nthreads, sizeof(*workers));
	if (!workers)
		die("calloc");
	/* Bind everything before "ready", and before any worker runs, so a port in use fails
	 * the start-up with a message rather than half-serving. */
	for (int p = 0; p < nports; p++) {
		struct address at;
		if (!parse_address(bind_text, ports[p], &at))
			usage("server: --bind takes an IPv4 or IPv6 address");
		check_port_free(&at, SOCK_STREAM);
		check_port_free(&at, SOCK_DGRAM);
	}
	for (int t = 0; t < nthreads; t++) {
		struct server_worker *w = &workers[t];
		w->epoll = epoll_create1(EPOLL_CLOEXEC);
		if (w->epoll < 0)
			die("epoll_create1");
		watch(w->epoll, wake, EV_WAKE);
		for (int p = 0; p < nports; p++) {
			struct address at;
			if (!parse_address(bind_text, ports[p], &at))
				usage("server: --bind takes an IPv4 or IPv6 address");
			int tcp = server_socket(&at, SOCK_STREAM), udp = server_socket(&at, SOCK_DGRAM);
			watch(w->epoll, tcp, EV_LISTEN);
			watch(w->epoll, udp, EV_UDP);
			w->fds[w->nfds++] = tcp;
			w->fds[w->nfds++] = udp;
		}
	}
	for (int t = 0; t < nthreads; t++)
		if ((errno = pthread_create(&workers[t].thread, NULL, server_run, &workers[t])))
			die("pthread_create");
	printf("ready\n");
	fflush(stdout);

	int sig;
	sigwait(&stop, &sig);
	uint64_t one = 1;
	if (write(wake, &one, sizeof(one)) < 0)
		die("eventfd write");
	for (int t = 0; t < nthreads; t++) {
		pthread_join(workers[t].thread, NULL);
		for (int i = 0; i < workers[t].nfds; i++)
			close(workers[t].fds[i]);
		close(workers[t].epoll);
	}
	return 0;
}

/* -- latency histogram ----------------------------------------------------------------- */

/* Log-linear like HdrHistogram: exact below 256 ns, then 128 buckets per power of two
 * (under 0.8 % relative error) up to 2^40 ns (18 min). Fixed size: nothing is allocated
 * per sample, and recording is a few instructions. */
#define SUB_BITS 7
#define SUB_COUNT (1u << SUB_BITS)
#define MAX_EXP 40
#define BUCKETS (2 * SUB_COUNT + (MAX_EXP - SUB_BITS - 1) * SUB_COUNT)

struct histogram {
	uint64_t count[BUCKETS];
	uint64_t total, max_ns, min_ns, sum_ns;
};

static unsigned bucket_of(uint64_t ns)
{
	if (ns < 2 * SUB_COUNT)
		return (unsigned)ns;
	unsigned exp = 63u - (unsigned)__builtin_clzll(ns); /* >= SUB_BITS + 1 */
	if (exp >= MAX_EXP)
		return BUCKETS - 1;
	unsigned shift = exp - SUB_BITS;
	return 2 * SUB_COUNT + (shift - 1) * SUB_COUNT + (unsigned)((ns >> shift) - SUB_COUNT);
}

/* The middle of a bucket's range of values. */
static double bucket_value(unsigned b)
{
	if (b < 2 * SUB_COUNT)
		return b;
	unsigned shift = (b - 2 * SUB_COUNT) / SUB_COUNT + 1;
	uint64_t low = ((uint64_t)(SUB_COUNT + (b - 2 * SUB_COUNT) % SUB_COUNT)) << shift;
	return (double)low + (double)((1ull << shift) - 1) / 2.0;
}

static void record(struct histogram *h, uint64_t ns)
{
	h->count[bucket_of(ns)]++;
	h->total++;
	h->sum_ns += ns;
	if (ns > h->max_ns)
		h->max_ns = ns;
	if (ns < h->min_ns || h->total == 1)
		h->min_ns = ns;
}

static void merge(struct histogram *into, const struct histogram *h)
{
	if (!h->total)
		return;
	for (unsigned b = 0; b < BUCKETS; b++)
		into->count[b] += h->count[b];
	if (!into->total || h->min_ns < into->min_ns)
		into->min_ns = h->min_ns;
	if (h->max_ns > into->max_ns)
		into->max_ns = h->max_ns;
	into->total += h->total;
	into->sum_ns += h->sum_ns;
}

static double percentile_ns(const struct histogram *h, double p)
{
	/* The smallest value with at least p of the samples at or below it. */
	double want = p * (double)h->total;
	uint64_t rank = (uint64_t)want, seen = 0;
	if ((double)rank < want || rank < 1)
		rank++;
	for (unsigned b = 0; b < BUCKETS; b++) {
		seen += h->count[b];
		if (seen >= rank) {
			double v = bucket_value(b);
			if (v > (double)h->max_ns)
				v = (double)h->max_ns;
			if (v < (double)h->min_ns)
				v = (double)h->min_ns;
			return v;
		}
	}
	return (double)h->max_ns;
}

/* -- clients --------------------------------------------------------------------------- */

/* Error kinds that are not an errno: the server closing before it answered (EOF), a UDP
 * answer from another address than asked (WRONG_SOURCE), anything unexpected (BAD_REPLY),
 * a bulk stream whose connection was up and saw nothing acknowledged in the window
 * (STALLED).
 * A bounded wait that ran out is ETIMEDOUT. Only transactions that start after the warmup
 * are counted as done; an error counts when it ends after the warmup, even one begun
 * before: a connect() that timed out across the warmup's end held the measured window up
 * (a bulk stream then measures nothing), and the result must say why. */
#define ERRNO_SLOTS 512
enum { ERR_STALLED = ERRNO_SLOTS - 4, ERR_EOF, ERR_WRONG_SOURCE, ERR_BAD_REPLY };

enum mode { TCP_CRR, TCP_RR, UDP_RR, UDP_CRR, TCP_STREAM };
static const char *const mode_names[] = {"tcp_crr", "tcp_rr", "udp_rr", "udp_crr", "tcp_stream"};

struct client_config {
	enum mode mode;
	struct address target;
	bool connected;
	uint64_t measure_from, stop_at; /* monotonic ns */
	uint64_t timeout_ns;
	struct timeval timeout;
	int timeout_ms;
	uint64_t interval_ns; /* --rate: a thread starts a transaction at most this often */
};

struct client_worker {
	pthread_t thread;
	const struct client_config *cfg;
	struct histogram hist;
	uint64_t errors[ERRNO_SLOTS];
	uint64_t bytes, last_end_ns;
	uint64_t retransmits; /* tcp_stream: segments its connections sent again (TCP_INFO) */
	unsigned id;
};

static void count_error(struct client_worker *w, int err)
{
	uint64_t end = now_ns();
	if (end >= w->cfg->measure_from) {
		w->errors[err > 0 && err < ERRNO_SLOTS ? err : ERR_BAD_REPLY]++;
		w->last_end_ns = end;
	}
}

static void count_done(struct client_worker *w, uint64_t started)
{
	uint64_t end = now_ns();
	if (started >= w->cfg->measure_from) {
		record(&w->hist, end - started);
		w->last_end_ns = end;
	}
}

static void set_timeouts(int fd, const struct client_config *cfg)
{
	/* Linux bounds a blocking connect() by SO_SNDTIMEO (it then fails with EINPROGRESS,
	 * counted as ETIMEDOUT) and recv() by SO_RCVTIMEO (EAGAIN, also ETIMEDOUT). */
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &cfg->timeout, sizeof(cfg->timeout));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &cfg->timeout, sizeof(cfg->timeout));
}

static int timeout_errno(int err)
{
	return err == EAGAIN || err == EINPROGRESS ? ETIMEDOUT : err;
}

/* A blocking TCP socket to the target, or -1 with errno set. */
static int tcp_connect(const struct client_config *cfg, bool linger0)
{
	int fd = socket(cfg->target.family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	if (linger0) {
		/* Close with RST instead of FIN: the socket is freed at once, with no TIME_WAIT.
		 * The client closes first, so without this each connection holds its ephemeral
		 * port in TIME_WAIT for 60 s, and the default range (32768-60999, 28k ports)
		 * lasts about a second at 25k connections/s. Measured between lab pods without
		 * it: 16k TIME_WAIT sockets after 3 s, connect() slowed to ~2 ms at p90 while the
		 * kernel hunted for a free port (25k/s fell to 5.5k/s), then EADDRNOTAVAIL.
		 * The server reads ECONNRESET and closes; neither side is left in TIME_WAIT, and
		 * a conntrack entry (iptables/nftables paths) goes to CLOSE (10 s), not
		 * TIME_WAIT (120 s). The data exchange is complete before the RST, so nothing
		 * measured is lost to it. */
		struct linger lg = {.l_onoff = 1, .l_linger = 0};
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	}
	set_timeouts(fd, cfg);
	if (connect(fd, (const struct sockaddr *)&cfg->target.sa, cfg->target.len) < 0) {
		int err = errno;
		close(fd);
		errno = timeout_errno(err);
		return -1;
	}
	return fd;
}

/* Send one byte, read one byte back: 0, or an error code. */
static int exchange_byte(int fd)
{
	char c = 'r';
	if (send(fd, &c, 1, MSG_NOSIGNAL) != 1)
		return errno;
	ssize_t n = recv(fd, &c, 1, 0);
	if (n == 1)
		return 0;
	return n == 0 ? ERR_EOF : timeout_errno(errno);
}

/* With --rate, wait for the thread's next slot (slots missed are not made up for). */
static void pace(const struct client_config *cfg, uint64_t *next)
{
	if (!cfg->interval_ns)
		return;
	uint64_t now = now_ns();
	if (*next > now) {
		struct timespec ts = {.tv_sec = (time_t)((*next - now) / 1000000000u),
				      .tv_nsec = (long)((*next - now) % 1000000000u)};
		nanosleep(&ts, NULL);
		now = *next;
	}
	*next = now + cfg->interval_ns;
}

static void run_tcp_crr(struct client_worker *w)
{
	const struct client_config *cfg = w->cfg;
	uint64_t next = 0;
	for (uint64_t start; pace(cfg, &next), (start = now_ns()) < cfg->stop_at;) {
		int fd = tcp_connect(cfg, true);
		if (fd < 0) {
			count_error(w, errno);
			continue;
		}
		int err = exchange_byte(fd);
		close(fd);
		if (err)
			count_error(w, err);
		else
			count_done(w, start);
	}
}

static void run_tcp_rr(struct client_worker *w)
{
	const struct client_config *cfg = w->cfg;
	int fd = -1;
	for (uint64_t start; (start = now_ns()) < cfg->stop_at;) {
		if (fd < 0) {
			/* (Re)connecting is not a transaction; a failure to is an error. */
			if ((fd = tcp_connect(cfg, true)) < 0) {
				count_error(w, errno);
				continue;
			}
			int one = 1;
			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			start = now_ns();
		}
		int err = exchange_byte(fd);
		if (err) {
			count_error(w, err);
			close(fd);
			fd = -1;
		} else {
			count_done(w, start);
		}
	}
	if (fd >= 0)
		close(fd);
}

/* One UDP request and its answer on fd; the 8-byte request carries a sequence number so a
 * late answer to an earlier (timed-out) request is recognised and skipped. */
static int udp_exchange(struct client_worker *w, int fd, uint64_t seq)
{
	const struct client_config *cfg = w->cfg;
	ssize_t n = cfg->connected
			    ? send(fd, &seq, sizeof(seq), 0)
			    : sendto(fd, &seq, sizeof(seq), 0, (const struct sockaddr *)&cfg->target.sa,
				     cfg->target.len);
	if (n < 0)
		return errno;
	uint64_t deadline = now_ns() + (uint64_t)cfg->timeout_ms * 1000000u;
	for (;;) {
		struct pollfd pfd = {.fd = fd, .events = POLLIN};
		uint64_t now = now_ns();
		if (now >= deadline)
			return ETIMEDOUT;
		int ready = poll(&pfd, 1, (int)((deadline - now + 999999) / 1000000));
		if (ready < 0 && errno != EINTR)
			return errno;
		if (ready <= 0)
			continue;
		uint64_t answer;
		struct sockaddr_storage from;
		socklen_t len = sizeof(from);
		n = recvfrom(fd, &answer, sizeof(answer), MSG_DONTWAIT, (struct sockaddr *)&from, &len);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			return errno; /* ECONNREFUSED on a connected socket: ICMP port unreachable */
		}
		if (n != sizeof(answer) || answer != seq)
			continue; /* stale */
		/* An unconnected socket must see the answer come from the address it asked:
		 * a service proxy has to rewrite the backend's source back (recvmsg hook/DNAT). */
		if (!cfg->connected && !same_address(&cfg->target, &from))
			return ERR_WRONG_SOURCE;
		return 0;
	}
}

static int udp_socket(const struct client_config *cfg)
{
	int fd = socket(cfg->target.family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	if (cfg->connected &&
	    connect(fd, (const struct sockaddr *)&cfg->target.sa, cfg->target.len) < 0) {
		int err = errno;
		close(fd);
		errno = err;
		return -1;
	}
	return fd;
}

static void run_udp(struct client_worker *w, bool new_socket_each)
{
	const struct client_config *cfg = w->cfg;
	uint64_t seq = (uint64_t)w->id << 48;
	int fd = -1;
	for (uint64_t start; (start = now_ns()) < cfg->stop_at;) {
		if (fd < 0 && (fd = udp_socket(cfg)) < 0) {
			count_error(w, errno);
			continue;
		}
		int err = udp_exchange(w, fd, ++seq);
		if (err)
			count_error(w, err);
		else
			count_done(w, start);
		if (new_socket_each) {
			close(fd);
			fd = -1;
		}
	}
	if (fd >= 0)
		close(fd);
}

/* Bytes the peer has acknowledged = bytes written - what is still in our send queue. */
static int unacked(int fd)
{
	int queued = 0;
	if (ioctl(fd, SIOCOUTQ, &queued) < 0)
		return 0;
	return queued;
}

/* Segments fd's connection sent again: a STALLED stream with some lost packets on the way;
 * with none, the sender or the receiver did not run (or read). */
static uint64_t retransmitted(int fd)
{
	struct tcp_info info;
	socklen_t len = sizeof(info);
	memset(&info, 0, sizeof(info));
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) < 0)
		return 0;
	return info.tcpi_total_retrans;
}

/* A blocking send() bounded by the window's next edge when that comes before --timeout:
 * the stream's loop is back at the warmup's end and at the deadline even while the peer
 * acknowledges nothing, so the window is measured at its edges. Else one send() blocked
 * across the warmup's end (its 64 KiB waiting for room) started the window only when it
 * returned, and one blocked across the whole window measured nothing and said nothing:
 * bits_per_second 0, errors {}. Returns send()'s result; *at_edge: it was cut at the edge. */
static ssize_t send_until(int fd, const void *buf, size_t len, uint64_t edge,
			  const struct client_config *cfg, bool *at_edge)
{
	uint64_t now = now_ns(), wait = cfg->timeout_ns;
	*at_edge = edge > now && edge - now < wait;
	if (*at_edge)
		wait = edge - now;
	struct timeval tv = {.tv_sec = (time_t)(wait / 1000000000u),
			     .tv_usec = (suseconds_t)(wait % 1000000000u / 1000u)};
	if (tv.tv_sec == 0 && tv.tv_usec == 0)
		tv.tv_usec = 1; /* zero would mean "wait forever" */
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	return send(fd, buf, len, MSG_NOSIGNAL);
}

static void run_tcp_stream(struct client_worker *w)
{
	const struct client_config *cfg = w->cfg;
	static __thread char buf[BULK_SIZE];
	memset(buf, 'x', sizeof(buf));
	int fd = -1;
	bool measuring = false;
	int64_t delivered = 0; /* in the measured window */
	for (uint64_t start; (start = now_ns()) < cfg->stop_at;) {
		if (fd < 0) {
			if ((fd = tcp_connect(cfg, false)) < 0) {
				count_error(w, errno);
				continue;
			}
			if (send(fd, "S", 1, MSG_NOSIGNAL) != 1) {
				count_error(w, errno);
				close(fd);
				fd = -1;
				continue;
			}
		}
		if (!measuring && start >= cfg->measure_from) {
			measuring = true;
			delivered = unacked(fd); /* written before the window, delivered in it */
		}
		bool at_edge;
		ssize_t n = send_until(fd, buf, sizeof(buf),
				       measuring ? cfg->stop_at : cfg->measure_from, cfg, &at_edge);
		if (n < 0) {
			if (at_edge && (errno == EAGAIN || errno == EWOULDBLOCK))
				continue; /* the edge came first: not an error */
			count_error(w, timeout_errno(errno));
			w->retransmits += retransmitted(fd);
			close(fd);
			fd = -1;
			continue;
		}
		if (measuring) {
			delivered += n;
			w->last_end_ns = now_ns();
		}
	}
	if (fd >= 0) {
		if (measuring)
			delivered -= unacked(fd);
		if (delivered <= 0)
			count_error(w, ERR_STALLED); /* up through the window, nothing went */
		w->retransmits += retransmitted(fd);
		close(fd);
	}
	w->bytes = delivered > 0 ? (uint64_t)delivered : 0;
}

static void run_udp_rr(struct client_worker *w)
{
	run_udp(w, false);
}

static void run_udp_crr(struct client_worker *w)
{
	run_udp(w, true);
}

/* What a client thread runs, by enum mode (the names are mode_names) */
static void (*const mode_runs[])(struct client_worker *) = {
	[TCP_CRR] = run_tcp_crr, [TCP_RR] = run_tcp_rr, [UDP_RR] = run_udp_rr,
	[UDP_CRR] = run_udp_crr, [TCP_STREAM] = run_tcp_stream,
};

static void *client_run(void *arg)
{
	struct client_worker *w = arg;
	mode_runs[w->cfg->mode](w);
	return NULL;
}

static const char *error_name(int slot, char *spare, size_t size)
{
	switch (slot) {
	case ERR_STALLED:
		return "STALLED";
	case ERR_EOF:
		return "EOF";
	case ERR_WRONG_SOURCE:
		return "WRONG_SOURCE";
	case ERR_BAD_REPLY:
		return "BAD_REPLY";
	}
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
	const char *name = strerrorname_np(slot);
	if (name)
		return name;
#endif
	snprintf(spare, size, "ERRNO_%d", slot);
	return spare;
}

/* "errors": {"<name>": count, ...} of the slots that counted any (JSON, no newline) */
static void print_errors(const uint64_t errors[ERRNO_SLOTS])
{
	printf("\"errors\": {");
	const char *sep = "";
	for (int e = 0; e < ERRNO_SLOTS; e++) {
		if (!errors[e])
			continue;
		char spare[32];
		printf("%s\"%s\": %" PRIu64, sep, error_name(e, spare, sizeof(spare)), errors[e]);
		sep = ", ";
	}
	printf("}");
}

static void print_us(const char *key, double ns, bool any)
{
	if (any)
		printf(", \"%s\": %.1f", key, ns / 1000.0);
	else
		printf(", \"%s\": null", key);
}

static int cmd_client(struct client_config *cfg, int nthreads, double duration, double warmup,
		      double timeout, double rate)
{
	if (rate < 0)
		usage("--rate must be >= 0");
	if (rate > 0)
		cfg->interval_ns = (uint64_t)(1e9 * nthreads / rate);
	if (duration <= 0)
		usage("--duration must be > 0");
	if (warmup < 0 || timeout <= 0)
		usage("--warmup must be >= 0 and --timeout > 0");
	signal(SIGPIPE, SIG_IGN);
	raise_nofile();
	cfg->timeout.tv_sec = (time_t)timeout;
	cfg->timeout.tv_usec = (suseconds_t)((timeout - (double)(time_t)timeout) * 1e6);
	if (cfg->timeout.tv_sec == 0 && cfg->timeout.tv_usec == 0)
		cfg->timeout.tv_usec = 1; /* zero would mean "wait forever" */
	cfg->timeout_ms = (int)(timeout * 1000.0 + 0.999);
	cfg->timeout_ns = (uint64_t)(timeout * 1e9);
	uint64_t begin = now_ns();
	cfg->measure_from = begin + (uint64_t)(warmup * 1e9);
	cfg->stop_at = cfg->measure_from + (uint64_t)(duration * 1e9);

	struct client_worker *workers = calloc((size_t)nthreads, sizeof(*workers));
	if (!workers)
		die("calloc");
	for (int t = 0; t < nthreads; t++) {
		workers[t].cfg = cfg;
		workers[t].id = (unsigned)t;
		if ((errno = pthread_create(&workers[t].thread, NULL, client_run, &workers[t])))
			die("pthread_create");
	}
	struct histogram *all = calloc(1, sizeof(*all));
	uint64_t errors[ERRNO_SLOTS] = {0}, bytes = 0, retransmits = 0;
	uint64_t last_end = cfg->measure_from;
	if (!all)
		die("calloc");
	for (int t = 0; t < nthreads; t++) {
		pthread_join(workers[t].thread, NULL);
		merge(all, &workers[t].hist);
		for (int e = 0; e < ERRNO_SLOTS; e++)
			errors[e] += workers[t].errors[e];
		bytes += workers[t].bytes;
		retransmits += workers[t].retransmits;
		if (workers[t].last_end_ns > last_end)
			last_end = workers[t].last_end_ns;
	}
	/* The window ends at the deadline, or later if a transaction begun before it ran on. */
	if (last_end < cfg->stop_at)
		last_end = cfg->stop_at;
	double seconds = (double)(last_end - cfg->measure_from) / 1e9;

	printf("{\"mode\": \"%s\", \"threads\": %d", mode_names[cfg->mode], nthreads);
	printf(", ");
	print_errors(errors);
	printf(", \"seconds\": %.6f", seconds);
	if (cfg->mode == TCP_STREAM) {
		printf(", \"bytes\": %" PRIu64 ", \"bits_per_second\": %.0f", bytes,
		       (double)bytes * 8.0 / seconds);
		printf(", \"retransmits\": %" PRIu64, retransmits);
	} else {
		bool any = all->total > 0;
		printf(", \"transactions\": %" PRIu64 ", \"rate\": %.1f", all->total,
		       (double)all->total / seconds);
		print_us("p50_us", percentile_ns(all, 0.50), any);
		print_us("p90_us", percentile_ns(all, 0.90), any);
		print_us("p99_us", percentile_ns(all, 0.99), any);
		print_us("p999_us", percentile_ns(all, 0.999), any);
		print_us("min_us", (double)all->min_ns, any);
		print_us("mean_us", any ? (double)all->sum_ns / (double)all->total : 0, any);
		print_us("max_us", (double)all->max_ns, any);
	}
	printf("}\n");
	fflush(stdout);
	return 0;
}

/* -- udp_flood: one-way packets, counted by the receiver --------------------------------- */

struct flood_config {
	struct address target;
	int flows, size;
	double duration, rate; /* rate 0: as fast as the sender can */
};

/* Sends FLOOD_BATCH datagrams per sendmmsg() on each of `flows` connected sockets in turn,
 * so every flow (source port) carries an equal share. Paced: before each batch, waits until
 * the packets sent so far are due (a run's rate is exact; bursts are one batch). A send the
 * kernel refuses (ENOBUFS, EAGAIN) is counted by errno and its datagrams as not sent. */
static int cmd_udp_flood(const struct flood_config *cfg)
{
	if (cfg->flows < 1 || cfg->flows > MAX_FLOWS)
		usage("--flows takes 1-1024");
	if (cfg->size < 1 || cfg->size > 1400)
		usage("--size takes 1-1400 (bytes of UDP payload)");
	if (cfg->duration <= 0 || cfg->rate < 0)
		usage("--duration must be > 0 and --rate >= 0");
	raise_nofile();
	int fds[MAX_FLOWS];
	for (int f = 0; f < cfg->flows; f++) {
		fds[f] = socket(cfg->target.family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (fds[f] < 0)
			die("socket");
		if (connect(fds[f], (const struct sockaddr *)&cfg->target.sa, cfg->target.len) < 0)
			die("connect");
	}
	static char payload[1400];
	memset(payload, 'f', sizeof(payload));
	struct iovec iov = {.iov_base = payload, .iov_len = (size_t)cfg->size};
	struct mmsghdr msgs[FLOOD_BATCH];
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < FLOOD_BATCH; i++) {
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	uint64_t errors[ERRNO_SLOTS] = {0}, sent = 0, batches = 0;
	uint64_t begin = now_ns(), stop_at = begin + (uint64_t)(cfg->duration * 1e9), now = begin;
	for (int f = 0; (now = now_ns()) < stop_at; f = (f + 1) % cfg->flows) {
		if (cfg->rate > 0) {
			uint64_t due = begin + (uint64_t)((double)sent * 1e9 / cfg->rate);
			if (due > stop_at)
				break;
			if (due > now) {
				struct timespec ts = {.tv_sec = (time_t)(due / 1000000000u),
						      .tv_nsec = (long)(due % 1000000000u)};
				clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
			}
		}
		int n = sendmmsg(fds[f], msgs, FLOOD_BATCH, 0);
		batches++;
		if (n < 0) {
			errors[errno > 0 && errno < ERRNO_SLOTS ? errno : ERR_BAD_REPLY]++;
			continue;
		}
		sent += (uint64_t)n;
	}
	double seconds = (double)(now_ns() - begin) / 1e9;
	for (int f = 0; f < cfg->flows; f++)
		close(fds[f]);
	printf("{\"mode\": \"udp_flood\", \"threads\": 1, \"flows\": %d, \"size\": %d, ",
	       cfg->flows, cfg->size);
	print_errors(errors);
	printf(", \"seconds\": %.6f, \"packets\": %" PRIu64 ", \"batches\": %" PRIu64
	       ", \"rate\": %.1f, \"asked_rate\": %.1f}\n",
	       seconds, sent, batches, (double)sent / seconds, cfg->rate);
	fflush(stdout);
	return 0;
}

/* -- command line ---------------------------------------------------------------------- */

static double number(const char *opt, const char *text)
{
	char *end;
	double v = strtod(text, &end);
	if (end == text || *end || !(v > -1e9 && v < 1e9)) {
		fprintf(stderr, "loadgen: %s: not a number: %s\n", opt, text);
		exit(2);
	}
	return v;
}

static int port_number(const char *text)
{
	double v = number("--port", text);
	if (v < 1 || v > 65535 || v != (int)v)
		usage("--port takes 1-65535");
	return (int)v;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage("give a subcommand");
	const char *cmd = argv[1], *addr = NULL, *bind_text = "0.0.0.0";
	int ports[MAX_PORTS], nports = 0, nthreads = 0;
	double duration = 0, warmup = 0, timeout = 1.0, rate = 0;
	int flows = 64, size = 18; /* udp_flood: 18 bytes of payload make a 64-byte frame */
	bool connected = false;
	for (int i = 2; i < argc; i++) {
		const char *opt = argv[i];
		if (!strcmp(opt, "--connected")) {
			connected = true;
			continue;
		}
		if (i + 1 >= argc)
			usage("an option lacks its value");
		const char *val = argv[++i];
		if (!strcmp(opt, "--port")) {
			if (nports == MAX_PORTS)
				usage("too many --port");
			ports[nports++] = port_number(val);
		} else if (!strcmp(opt, "--addr")) {
			addr = val;
		} else if (!strcmp(opt, "--bind")) {
			bind_text = val;
		} else if (!strcmp(opt, "--threads")) {
			double t = number(opt, val);
			if (t < 1 || t > MAX_THREADS || t != (int)t)
				usage("--threads takes 1-256");
			nthreads = (int)t;
		} else if (!strcmp(opt, "--duration")) {
			duration = number(opt, val);
		} else if (!strcmp(opt, "--warmup")) {
			warmup = number(opt, val);
		} else if (!strcmp(opt, "--timeout")) {
			timeout = number(opt, val);
		} else if (!strcmp(opt, "--rate")) {
			rate = number(opt, val);
		} else if (!strcmp(opt, "--flows")) {
			flows = (int)number(opt, val);
		} else if (!strcmp(opt, "--size")) {
			size = (int)number(opt, val);
		} else {
			usage("unknown option");
		}
	}
	if (!strcmp(cmd, "server")) {
		if (!nthreads) {
			long cpus = sysconf(_SC_NPROCESSORS_ONLN);
			nthreads = cpus < 1 ? 1 : cpus > MAX_THREADS ? MAX_THREADS : (int)cpus;
		}
		return cmd_server(ports, nports, bind_text, nthreads);
	}
	if (!strcmp(cmd, "udp_flood")) {
		struct flood_config flood = {.flows = flows, .size = size, .duration = duration,
					     .rate = rate};
		if (!addr || nports != 1)
			usage("udp_flood takes --addr and one --port");
		if (!parse_address(addr, ports[0], &flood.target))
			usage("--addr takes an IPv4 or IPv6 address");
		return cmd_udp_flood(&flood);
	}
	struct client_config cfg = {.connected = connected};
	unsigned m;
	for (m = 0; m < sizeof(mode_names) / sizeof(mode_names[0]); m++)
		if (!strcmp(cmd, mode_names[m]))
			break;
	if (m == sizeof(mode_names) / sizeof(mode_names[0]))
		usage("unknown subcommand");
	cfg.mode = (enum mode)m;
	if (!addr || nports != 1)
		usage("a client takes --addr and one --port");
	if (!parse_address(addr, ports[0], &cfg.target))
		usage("--addr takes an IPv4 or IPv6 address");
	return cmd_client(&cfg, nthreads ? nthreads : 1, duration, warmup, timeout, rate);
}
