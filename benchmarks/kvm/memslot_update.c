/*
 * What one memslot update costs on a real KVM host: the source of the cost model's
 * srcu_expedited_grace_period (docs/engine.md). Toggling KVM_MEM_LOG_DIRTY_PAGES on an empty
 * slot is a flags-only update: kvm_set_memslot swaps the memslots (kvm_swap_active_memslots,
 * one synchronize_srcu_expedited) and write-protects nothing, so the time per call is the
 * grace period plus the ioctl; a KVM_CHECK_EXTENSION is timed next to it for the ioctl alone.
 *
 *   cc -O2 -o memslot_update memslot_update.c && ./memslot_update [vcpus]
 *
 * Needs read/write access to /dev/kvm. vCPUs are created and never run, so none is inside
 * kvm->srcu: the grace period has no reader to wait for.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

static double now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv)
{
	int vcpus = argc > 1 ? atoi(argv[1]) : 0, rounds = 2000;
	size_t size = 64 << 20;
	int kvm = open("/dev/kvm", O_RDWR);
	int vm = kvm < 0 ? -1 : ioctl(kvm, KVM_CREATE_VM, 0);
	void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = size,
		.userspace_addr = (unsigned long)mem,
	};

	if (vm < 0 || mem == MAP_FAILED) {
		perror("/dev/kvm");
		return 1;
	}
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region)) {
		perror("KVM_SET_USER_MEMORY_REGION");
		return 1;
	}
	for (int i = 0; i < vcpus; i++)
		if (ioctl(vm, KVM_CREATE_VCPU, i) < 0) {
			perror("KVM_CREATE_VCPU");
			return 1;
		}
	double t0 = now_ns();
	for (int i = 0; i < rounds; i++) {
		region.flags ^= KVM_MEM_LOG_DIRTY_PAGES;
		if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region)) {
			perror("toggle");
			return 1;
		}
	}
	double t1 = now_ns();
	for (int i = 0; i < rounds; i++)
		ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY);
	double t2 = now_ns();
	printf("vcpus %d: memslot flags update %.1f us, KVM_CHECK_EXTENSION %.2f us\n", vcpus,
	       (t1 - t0) / rounds / 1e3, (t2 - t1) / rounds / 1e3);
	return 0;
}
