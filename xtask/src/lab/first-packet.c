/* first-packet ADDR PORT MS: the container of a pod that sends from its first instant. From the
 * moment it starts it sends one UDP datagram ("<hostname> <n>") to ADDR:PORT every millisecond
 * for MS milliseconds, prints how many it sent, then sleeps. `cargo xtask e2e` counts what
 * arrives to show that a new pod under a default-deny policy gets nothing through. */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: first-packet ADDR PORT MS\n");
    return 2;
  }
  struct sockaddr_in to = {0};
  to.sin_family = AF_INET;
  to.sin_port = htons((unsigned short)atoi(argv[2]));
  if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) {
    fprintf(stderr, "first-packet: %s is not an IPv4 address\n", argv[1]);
    return 2;
  }
  char host[64] = "pod";
  gethostname(host, sizeof host - 1);
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  if (s < 0) {
    perror("first-packet: socket");
    return 1;
  }
  long ms = atol(argv[3]), sent = 0, failed = 0;
  struct timespec tick = {0, 1000000};
  for (long i = 0; i < ms; i++) {
    char msg[128];
    int n = snprintf(msg, sizeof msg, "%s %ld", host, i);
    if (sendto(s, msg, (size_t)n, 0, (struct sockaddr *)&to, sizeof to) == n)
      sent++;
    else
      failed++;
    nanosleep(&tick, NULL);
  }
  printf("first-packet: sent %ld, failed %ld\n", sent, failed);
  fflush(stdout);
  for (;;)
    pause();
}
