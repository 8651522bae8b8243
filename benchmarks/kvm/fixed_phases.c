/*
 * The fixed phases of demand_paging_test on a real KVM host, for the cost model (docs/engine.md,
 * "The test's fixed phases"): creating a VM, a vCPU (with its kvm_run mapping), a memslot of a
 * given size (which allocates the rmaps when KVM's TDP MMU is off: tdp_mmu=N), and starting and
 * joining a thread.
 *
 *   cc -O2 -pthread -o fixed_phases fixed_phases.c && ./fixed_phases
 *
 * Needs read/write access to /dev/kvm. Prints one line per phase, microseconds per operation.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void *nothing(void *arg)
{
	return arg;
}

static int check(int ret, const char *what)
{
	if (ret < 0) {
		perror(what);
		exit(1);
	}
	return ret;
}

int main(void)
{
	int kvm = check(open("/dev/kvm", O_RDWR), "/dev/kvm");
	int run_size = check(ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE");
	double t0, t1;
	int rounds = 20;

	t0 = now_us();
	for (int i = 0; i < rounds; i++)
		close(check(ioctl(kvm, KVM_CREATE_VM, 0), "KVM_CREATE_VM"));
	t1 = now_us();
	printf("KVM_CREATE_VM (and close): %.1f us\n", (t1 - t0) / rounds);

	int vm = check(ioctl(kvm, KVM_CREATE_VM, 0), "KVM_CREATE_VM");
	int vcpus = 64;
	t0 = now_us();
	for (int i = 0; i < vcpus; i++) {
		int fd = check(ioctl(vm, KVM_CREATE_VCPU, i), "KVM_CREATE_VCPU");
		if (mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) == MAP_FAILED)
			check(-1, "mmap kvm_run");
	}
	t1 = now_us();
	printf("KVM_CREATE_VCPU + kvm_run mmap: %.1f us per vCPU (%d)\n", (t1 - t0) / vcpus, vcpus);

	for (int shift = 28; shift <= 34; shift += 2) {
		size_t size = (size_t)1 << shift;
		void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		struct kvm_userspace_memory_region r = {
			.slot = 1, .guest_phys_addr = 1ull << 36, .memory_size = size,
			.userspace_addr = (unsigned long)mem,
		};

		if (mem == MAP_FAILED)
			check(-1, "mmap");
		t0 = now_us();
		check(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r), "create memslot");
		t1 = now_us();
		r.memory_size = 0;
		double t2 = now_us();
		check(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r), "delete memslot");
		double t3 = now_us();
		printf("memslot of %zu MiB: create %.1f us, delete %.1f us\n", size >> 20, t1 - t0,
		       t3 - t2);
		munmap(mem, size);
	}

	rounds = 1000;
	t0 = now_us();
	for (int i = 0; i < rounds; i++) {
		pthread_t t;

		pthread_create(&t, NULL, nothing, NULL);
		pthread_join(t, NULL);
	}
	t1 = now_us();
	printf("pthread_create + pthread_join: %.1f us\n", (t1 - t0) / rounds);
	return 0;
}
