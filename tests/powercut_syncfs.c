/* An LD_PRELOAD shim for the power-cut tests: tells tests/powercut_fs.py of each syncfs(2), which FUSE does not
 * pass on to its file systems (only virtiofs has it). After the real syncfs succeeds, it sets the extended
 * attribute user.powercut.syncfs on the same fd; on any other file system that fails and is ignored. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/xattr.h>

int syncfs(int fd) {
    int (*real_syncfs)(int) = (int (*)(int))dlsym(RTLD_NEXT, "syncfs");
    int rc = real_syncfs(fd);
    if (rc == 0) {
        int saved = errno;
        fsetxattr(fd, "user.powercut.syncfs", "1", 1, 0);
        errno = saved;
    }
    return rc;
}
