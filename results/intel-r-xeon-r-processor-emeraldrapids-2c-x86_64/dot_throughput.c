// Throughput of vdpbf16ps vs vfmadd231ps (zmm, 12 independent chains, one core): gcc -O2 -march=native dot_throughput.c && ./a.out
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){
  const long N=200000000; __m512 a[12]; for(int i=0;i<12;i++)a[i]=_mm512_set1_ps(i*1e-9f);
  __m512 b=_mm512_set1_ps(1.0f), c=_mm512_set1_ps(1e-9f);
  __m512bh x=(__m512bh)_mm512_set1_epi32(0x3f803f80), y=(__m512bh)_mm512_set1_epi32(0x00010001);
  double t0=now();
  for(long n=0;n<N;n++){
    #pragma GCC unroll 12
    for(int i=0;i<12;i++) a[i]=_mm512_fmadd_ps(a[i],b,c);
    __asm__ volatile(""::"x"(a[0]));
  }
  double tf=now()-t0; t0=now();
  for(long n=0;n<N;n++){
    #pragma GCC unroll 12
    for(int i=0;i<12;i++) a[i]=_mm512_dpbf16_ps(a[i],x,y);
    __asm__ volatile(""::"x"(a[0]));
  }
  double tb=now()-t0; float s=0; for(int i=0;i<12;i++) s+=_mm512_reduce_add_ps(a[i]);
  printf("vfmadd231ps zmm: %.2f G instr/s; vdpbf16ps zmm: %.2f G instr/s (ratio %.2f) [%g]\n", N*12/tf/1e9, N*12/tb/1e9, tf/tb, s);
}
