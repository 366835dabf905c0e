// A CUPTI activity tracer for any CUDA process (fluxflow or the PyTorch reference), loaded by
// the CUDA driver through CUDA_INJECTION64_PATH (the GPU machine has no Nsight Systems):
//   CUDA_INJECTION64_PATH=/path/libfluxprof.so FLUXPROF_OUT=trace.tsv fluxflow bench ...
// Writes every kernel, memcpy and memset as a tab-separated line to $FLUXPROF_OUT: kernel names
// once as "N id name", then "K start end name_id stream", "C start end copy_kind bytes" and
// "S start end 0 bytes" (nanoseconds). scripts/gpu-trace/summarize.py reads it.
// Built by scripts/gpu-pack.sh against the CUPTI headers of the nvidia-cuda-cupti wheel.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#define BUF (8 << 20)
static FILE *out;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char *names[65536];
static int nnames;

static int name_id(const char *n) {
  if (!n) n = "?";
  for (int i = nnames - 1; i >= 0; i--) if (!strcmp(names[i], n)) return i;
  if (nnames >= 65536) return 0;
  names[nnames] = strdup(n);
  fprintf(out, "N\t%d\t%s\n", nnames, n);
  return nnames++;
}

static void CUPTIAPI req(uint8_t **buffer, size_t *size, size_t *max) {
  *buffer = aligned_alloc(8, BUF); *size = BUF; *max = 0;
}

static void CUPTIAPI done(CUcontext c, uint32_t s, uint8_t *buffer, size_t size, size_t valid) {
  CUpti_Activity *r = NULL;
  pthread_mutex_lock(&mu);
  while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
    if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || r->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)r;
      fprintf(out, "K\t%llu\t%llu\t%d\t%u\n", (unsigned long long)k->start,
              (unsigned long long)k->end, name_id(k->name), k->streamId);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)r;
      fprintf(out, "C\t%llu\t%llu\t%u\t%llu\n", (unsigned long long)m->start,
              (unsigned long long)m->end, m->copyKind, (unsigned long long)m->bytes);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)r;
      fprintf(out, "S\t%llu\t%llu\t0\t%llu\n", (unsigned long long)m->start,
              (unsigned long long)m->end, (unsigned long long)m->bytes);
    }
  }
  pthread_mutex_unlock(&mu);
  free(buffer);
}

static void fin(void) {
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  if (out) fflush(out);
}

int InitializeInjection(void) {
  const char *p = getenv("FLUXPROF_OUT");
  out = fopen(p ? p : "fluxprof.tsv", "w");
  if (!out) return 0;
  cuptiActivityRegisterCallbacks(req, done);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  atexit(fin);
  return 1;
}
