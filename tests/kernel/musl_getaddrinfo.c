/* getaddrinfo(name, AF_UNSPEC) as a musl-linked program sees it.
 *
 * Built at test time by tests/kernel/test_resolve_musl_trace.py with
 * `musl-gcc -static`, so the resolver that runs is musl's own
 * (src/network/lookup_name.c name_from_dns_search), reading the
 * /etc/resolv.conf that `ip netns exec` bind-mounts from /etc/netns/<ns>/.
 *
 * Prints "status ok" and one "addr <ip>" line per address (in musl's
 * sorted order), or "status EAI_<NAME>" naming getaddrinfo's error.
 * Exit status: 0 resolved, 1 not resolved, 2 bad usage.
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

static const char *eai_name(int rc)
{
	switch (rc) {
	case EAI_AGAIN: return "EAI_AGAIN";
	case EAI_FAIL: return "EAI_FAIL";
	case EAI_NONAME: return "EAI_NONAME";
	case EAI_NODATA: return "EAI_NODATA";
	case EAI_FAMILY: return "EAI_FAMILY";
	case EAI_MEMORY: return "EAI_MEMORY";
	case EAI_SERVICE: return "EAI_SERVICE";
	case EAI_SYSTEM: return "EAI_SYSTEM";
	default: return "EAI_OTHER";
	}
}

int main(int argc, char **argv)
{
	struct addrinfo hints, *res, *ai;
	char text[INET6_ADDRSTRLEN];
	int rc;

	if (argc != 2) {
		fprintf(stderr, "usage: %s NAME\n", argv[0]);
		return 2;
	}
	memset(&hints, 0, sizeof hints);
	hints.ai_family = AF_UNSPEC;
	/* One socket type, so each address is printed once. */
	hints.ai_socktype = SOCK_STREAM;
	rc = getaddrinfo(argv[1], NULL, &hints, &res);
	if (rc) {
		printf("status %s\n", eai_name(rc));
		return 1;
	}
	printf("status ok\n");
	for (ai = res; ai; ai = ai->ai_next) {
		const void *a = ai->ai_family == AF_INET
			? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
			: (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
		if (inet_ntop(ai->ai_family, a, text, sizeof text))
			printf("addr %s\n", text);
	}
	freeaddrinfo(res);
	return 0;
}
