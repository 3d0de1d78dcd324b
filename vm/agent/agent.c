/*
 * blixard-agent: runs one command at a time for the host, over one byte stream.
 *
 * In a microVM the stream is the virtio-serial port named "blixard.agent" (the agent is
 * the guest's PID 1, started by /init); for the `process` backend it is a unix socket the
 * agent listens on (`--listen PATH`). The host side is services/vms/agent.py; both follow
 * the same frames, and tests run them against each other end to end.
 *
 * Frame: type (1 byte), payload length (4 bytes, big-endian), payload.
 *   host -> agent                         agent -> host
 *   'P' ping (payload echoed)             'p' pong (the ping's payload)
 *   'I' info                              'i' info ("agent=1 kernel=<release> pid1=<0|1>")
 *   'E' exec (see read_exec)              'o' stdout bytes   'e' stderr bytes
 *                                         'x' exit: kind (1 byte: 0 exited, 1 signal),
 *                                             value (4 bytes, big-endian)
 *                                         'f' the command could not start (a message);
 *                                             no 'x' follows
 *   'S' signal the command's process group (4 bytes: signal number)
 *   'Q' power off (a VM) or exit (a process)
 *
 * Exec payload: u32 argc, argc strings; u32 envc, envc "KEY=VALUE" strings; one string
 * for the working directory ("" = "/"); a string is u32 length then its bytes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME (4u << 20)
#define CHUNK 32768

static int conn = -1;        /* the stream to the host */
static int listener = -1;    /* --listen: the socket we accept on */
static int is_device = 0;    /* a virtio-serial port: EOF means "host not connected" */
static const char *device_path;
static unsigned char *inbuf;
static size_t inlen, incap;

static pid_t child = 0;      /* the running command (its own process group) */
static int child_done = 0, child_status = 0;
static int out_fd = -1, err_fd = -1;
static long long child_exit_ms = 0;

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get_u32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int write_all(int fd, const void *data, size_t len) {
    const unsigned char *p = data;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                struct pollfd pfd = {fd, POLLOUT, 0};
                poll(&pfd, 1, 100);
                continue;
            }
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void send_frame(char type, const void *payload, uint32_t len) {
    unsigned char head[5];
    if (conn < 0) return;
    head[0] = (unsigned char)type;
    put_u32(head + 1, len);
    if (write_all(conn, head, 5) < 0 || (len && write_all(conn, payload, len) < 0)) {
        /* The host went away: the next read notices. */
    }
}

static void send_text(char type, const char *text) { send_frame(type, text, (uint32_t)strlen(text)); }

static void kill_command(int sig) {
    if (child > 0 && !child_done) kill(-child, sig);
}

static void reap(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (pid == child && !child_done) {
            child_done = 1;
            child_status = status;
            child_exit_ms = now_ms();
            /* The command is its leader's life: what it left running in its group goes. */
            kill(-child, SIGKILL);
        }
    }
}

static void finish_command(void) {
    unsigned char payload[5];
    if (WIFSIGNALED(child_status)) {
        payload[0] = 1;
        put_u32(payload + 1, (uint32_t)WTERMSIG(child_status));
    } else {
        payload[0] = 0;
        put_u32(payload + 1, (uint32_t)WEXITSTATUS(child_status));
    }
    send_frame('x', payload, 5);
    child = 0;
    child_done = 0;
}

/* Pull one length-prefixed string out of the exec payload. */
static char *take_string(const unsigned char **p, const unsigned char *end) {
    uint32_t len;
    char *s;
    if (end - *p < 4) return NULL;
    len = get_u32(*p);
    *p += 4;
    if ((uint32_t)(end - *p) < len) return NULL;
    s = malloc(len + 1);
    if (!s) return NULL;
    memcpy(s, *p, len);
    s[len] = 0;
    *p += len;
    return s;
}

static void start_command(const unsigned char *p, uint32_t len) {
    const unsigned char *end = p + len;
    uint32_t argc, envc, i;
    char **argv = NULL, **envp = NULL, *cwd = NULL;
    int outp[2] = {-1, -1}, errp[2] = {-1, -1}, failp[2] = {-1, -1};
    char message[512];

    if (child > 0) {
        send_text('f', "a command is already running in this VM");
        return;
    }
    if (end - p < 4) goto malformed;
    argc = get_u32(p); p += 4;
    if (argc == 0 || argc > 65536) goto malformed;
    argv = calloc(argc + 1, sizeof(char *));
    for (i = 0; i < argc; i++) if (!(argv[i] = take_string(&p, end))) goto malformed;
    if (end - p < 4) goto malformed;
    envc = get_u32(p); p += 4;
    if (envc > 65536) goto malformed;
    envp = calloc(envc + 3, sizeof(char *));
    for (i = 0; i < envc; i++) if (!(envp[i] = take_string(&p, end))) goto malformed;
    if (!(cwd = take_string(&p, end))) goto malformed;

    if (pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0 || pipe2(failp, O_CLOEXEC) < 0) {
        snprintf(message, sizeof message, "cannot make pipes: %s", strerror(errno));
        send_text('f', message);
        goto cleanup;
    }
    child = fork();
    if (child < 0) {
        child = 0;
        snprintf(message, sizeof message, "cannot fork: %s", strerror(errno));
        send_text('f', message);
        goto cleanup;
    }
    if (child == 0) {
        int devnull = open("/dev/null", O_RDONLY);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        setpgid(0, 0);
        if (devnull >= 0) dup2(devnull, 0);
        dup2(outp[1], 1);
        dup2(errp[1], 2);
        if (chdir(cwd[0] ? cwd : "/") < 0) {
            snprintf(message, sizeof message, "cannot change to the working directory %s: %s",
                     cwd, strerror(errno));
        } else {
            execvpe(argv[0], argv, envp);
            snprintf(message, sizeof message, "cannot run %s: %s", argv[0], strerror(errno));
        }
        if (write(failp[1], message, strlen(message)) < 0) _exit(127);
        _exit(127);
    }
    setpgid(child, child);
    close(outp[1]); outp[1] = -1;
    close(errp[1]); errp[1] = -1;
    close(failp[1]); failp[1] = -1;
    {
        /* The fail pipe closes on a successful exec (CLOEXEC) or carries why it failed. */
        ssize_t n;
        do n = read(failp[0], message, sizeof message - 1); while (n < 0 && errno == EINTR);
        if (n > 0) {
            int status;
            message[n] = 0;
            waitpid(child, &status, 0);
            child = 0;
            send_text('f', message);
            close(outp[0]);
            close(errp[0]);
            outp[0] = errp[0] = -1;
            goto cleanup;
        }
    }
    out_fd = outp[0]; outp[0] = -1;
    err_fd = errp[0]; errp[0] = -1;
    fcntl(out_fd, F_SETFL, O_NONBLOCK);
    fcntl(err_fd, F_SETFL, O_NONBLOCK);
    child_done = 0;
    goto cleanup;

malformed:
    send_text('f', "malformed exec request");
cleanup:
    if (argv) { for (i = 0; argv[i]; i++) free(argv[i]); free(argv); }
    if (envp) { for (i = 0; envp[i]; i++) free(envp[i]); free(envp); }
    free(cwd);
    if (outp[0] >= 0) close(outp[0]);
    if (outp[1] >= 0) close(outp[1]);
    if (errp[0] >= 0) close(errp[0]);
    if (errp[1] >= 0) close(errp[1]);
    if (failp[0] >= 0) close(failp[0]);
    if (failp[1] >= 0) close(failp[1]);
}

static void power_off(void) {
    kill_command(SIGKILL);
    if (getpid() == 1) {
        sync();
        reboot(RB_POWER_OFF);
    }
    exit(0);
}

static void handle_frame(char type, const unsigned char *payload, uint32_t len) {
    switch (type) {
    case 'P':
        send_frame('p', payload, len);
        break;
    case 'I': {
        struct utsname u;
        char text[400];
        uname(&u);
        snprintf(text, sizeof text, "agent=1 kernel=%s pid1=%d", u.release, getpid() == 1);
        send_text('i', text);
        break;
    }
    case 'E':
        start_command(payload, len);
        break;
    case 'S':
        if (len == 4) kill_command((int)get_u32(payload));
        break;
    case 'Q':
        power_off();
        break;
    default:
        break;
    }
}

static void host_gone(void) {
    /* Whatever ran for the host that left is not wanted any more. */
    kill_command(SIGKILL);
    inlen = 0;
    if (is_device) return; /* the port stays open; poll again until the host is back */
    close(conn);
    conn = -1;
}

static void read_conn(void) {
    ssize_t n;
    if (incap - inlen < CHUNK) {
        incap = incap ? incap * 2 : 65536;
        inbuf = realloc(inbuf, incap);
        if (!inbuf) exit(1);
    }
    n = read(conn, inbuf + inlen, incap - inlen);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (n <= 0) {
        host_gone();
        if (is_device) usleep(50000);
        return;
    }
    inlen += (size_t)n;
    while (inlen >= 5) {
        uint32_t len = get_u32(inbuf + 1);
        if (len > MAX_FRAME) { host_gone(); return; }
        if (inlen < 5 + (size_t)len) break;
        handle_frame((char)inbuf[0], inbuf + 5, len);
        if (conn < 0) return;
        memmove(inbuf, inbuf + 5 + len, inlen - 5 - len);
        inlen -= 5 + len;
    }
}

static void pump(int *fd, char type) {
    static unsigned char buf[CHUNK];
    ssize_t n = read(*fd, buf, sizeof buf);
    if (n > 0) {
        send_frame(type, buf, (uint32_t)n);
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        close(*fd);
        *fd = -1;
    }
}

static int open_listener(const char *path) {
    struct sockaddr_un addr;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path) { errno = ENAMETOOLONG; return -1; }
    strcpy(addr.sun_path, path);
    unlink(path);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 4) < 0) return -1;
    return fd;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc == 3 && strcmp(argv[1], "--listen") == 0) {
        listener = open_listener(argv[2]);
        if (listener < 0) { perror("blixard-agent: listen"); return 1; }
    } else if (argc == 2) {
        device_path = argv[1];
        is_device = 1;
        conn = open(device_path, O_RDWR | O_CLOEXEC);
        if (conn < 0) { perror("blixard-agent: open"); return 1; }
    } else {
        fprintf(stderr, "usage: blixard-agent PORT_DEVICE | --listen SOCKET\n");
        return 2;
    }
    for (;;) {
        struct pollfd fds[3];
        int nfds = 0, conn_i = -1, out_i = -1, err_i = -1, timeout = 1000;
        if (conn < 0 && listener >= 0) {
            struct pollfd lp = {listener, POLLIN, 0};
            reap();
            if (child > 0 && child_done && out_fd < 0 && err_fd < 0) { child = 0; child_done = 0; }
            if (poll(&lp, 1, 200) > 0) {
                conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
                inlen = 0;
            }
            continue;
        }
        fds[nfds].fd = conn; fds[nfds].events = POLLIN; fds[nfds].revents = 0; conn_i = nfds++;
        if (out_fd >= 0) { fds[nfds].fd = out_fd; fds[nfds].events = POLLIN; fds[nfds].revents = 0; out_i = nfds++; }
        if (err_fd >= 0) { fds[nfds].fd = err_fd; fds[nfds].events = POLLIN; fds[nfds].revents = 0; err_i = nfds++; }
        if (child > 0) timeout = 20;
        if (poll(fds, nfds, timeout) < 0 && errno != EINTR) continue;
        reap();
        if (out_i >= 0 && fds[out_i].revents) pump(&out_fd, 'o');
        if (err_i >= 0 && fds[err_i].revents) pump(&err_fd, 'e');
        if (child > 0 && child_done) {
            /* Its group was killed when it ended; what is left in the pipes is still
               read, unless something outside the group holds them open too long. */
            if ((out_fd < 0 && err_fd < 0) || now_ms() - child_exit_ms > 2000) {
                if (out_fd >= 0) { close(out_fd); out_fd = -1; }
                if (err_fd >= 0) { close(err_fd); err_fd = -1; }
                finish_command();
            }
        }
        if (fds[conn_i].revents & (POLLIN | POLLHUP | POLLERR)) {
            if (is_device && !(fds[conn_i].revents & POLLIN)) {
                /* A virtio-serial port with no host connected: wait for one. */
                if (child > 0) kill_command(SIGKILL);
                usleep(50000);
                continue;
            }
            read_conn();
        }
    }
}
