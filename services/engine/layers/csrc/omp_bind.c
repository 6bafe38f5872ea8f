/* Pin the calling thread's OpenMP team to CPUs. libgomp keeps a team's threads for the next
 * parallel region of the same size started by the same thread, so torch's parallel ops and
 * the C kernels then run on the threads pinned here (the process shares torch's libgomp).
 *
 * each != 0: thread t of the team on cpus[t] alone, one thread per CPU, as vLLM's CPU backend
 * binds (VLLM_CPU_OMP_THREADS_BIND); the calling thread is thread 0, on cpus[0]. Needs
 * ncpus >= nthreads.
 * each == 0: every thread of the team on the whole set (the threads float inside it). Unlike
 * pinning the calling thread alone, this also moves a team that already exists.
 *
 * Built by services/engine/layers/native.py; called by services/engine/layers/omp_bind.py. */
#define _GNU_SOURCE
#include <omp.h>
#include <sched.h>

int epd_bind_omp_threads(const int *cpus, int ncpus, int nthreads, int each) {
    if (ncpus < 1 || nthreads < 1 || (each && ncpus < nthreads)) return -1;
    cpu_set_t all;
    CPU_ZERO(&all);
    for (int i = 0; i < ncpus; i++) {
        if (cpus[i] < 0 || cpus[i] >= CPU_SETSIZE) return -1;
        CPU_SET(cpus[i], &all);
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        const int t = omp_get_thread_num();
        if (omp_get_num_threads() != nthreads) {
            failed = 1;
        } else if (each) {
            cpu_set_t one;
            CPU_ZERO(&one);
            CPU_SET(cpus[t], &one);
            failed |= sched_setaffinity(0, sizeof one, &one) != 0;
        } else {
            failed |= sched_setaffinity(0, sizeof all, &all) != 0;
        }
    }
    return failed ? -2 : 0;
}
