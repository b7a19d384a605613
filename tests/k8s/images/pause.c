/*
 * The pod sandbox's first process (the image kubelet names as its pause
 * image): it holds the pod's namespaces, reaps the orphans that end up as
 * its children, and exits at once on SIGTERM or SIGINT. As PID 1 of its
 * namespace it gets no default signal handling, hence the handlers.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signal_number) {
    (void)signal_number;
    _exit(0);
}

static void reap(int signal_number) {
    (void)signal_number;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction action = {0};
    action.sa_handler = stop;
    if (sigaction(SIGINT, &action, NULL) != 0 || sigaction(SIGTERM, &action, NULL) != 0) {
        return 1;
    }
    action.sa_handler = reap;
    action.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGCHLD, &action, NULL) != 0) {
        return 1;
    }
    for (;;) {
        pause();
    }
}
