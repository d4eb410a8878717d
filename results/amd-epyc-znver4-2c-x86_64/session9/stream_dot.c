// Stream a bf16 weight buffer once per pass: (a) vdpbf16ps on k-paired words, (b) widen (shift/mask) + 2 FMAs on
// the same k-paired words, (c) widen plain bf16 (zext+shift) + FMA. 2 OpenMP threads, 48 MB per pass.
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define BYTES (48L<<20)
#define NBUF 6
int main(){
  int nbuf=NBUF; char* bufs[NBUF];
  for(int i=0;i<nbuf;i++){bufs[i]=aligned_alloc(64,BYTES); memset(bufs[i],1,BYTES);}
  float out[64]={0};
  for(int mode=0;mode<3;mode++){
    double best=1e9;
    for(int rep=0;rep<12;rep++){
      char* buf=bufs[rep%nbuf];
      double t0=now();
      #pragma omp parallel num_threads(2)
      {
        int tid=omp_get_thread_num(); long n=BYTES/2/64; const __m512i* w=(const __m512i*)(buf+tid*(BYTES/2));
        __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0; __m512 x=_mm512_set1_ps(1.0f),y=_mm512_set1_ps(0.5f);
        __m512bh xb=(__m512bh)_mm512_set1_epi32(0x3f803f80);
        __m512i mask=_mm512_set1_epi32(0xffff0000);
        for(long i=0;i<n;i+=4){
          for(int j=0;j<4;j++){
            __m512i v=_mm512_load_si512(w+i+j);
            __m512* acc = j==0?&a0: j==1?&a1: j==2?&a2:&a3;
            if(mode==0) *acc=_mm512_dpbf16_ps(*acc,(__m512bh)v,xb);
            else if(mode==1){ *acc=_mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v,16)),x,*acc);
                              *acc=_mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v,mask)),y,*acc);}
            else { __m256i lo=_mm512_castsi512_si256(v), hi=_mm512_extracti64x4_epi64(v,1);
                   *acc=_mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(lo),16)),x,*acc);
                   *acc=_mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi),16)),y,*acc);}
          }
        }
        __m512 s=_mm512_add_ps(_mm512_add_ps(a0,a1),_mm512_add_ps(a2,a3));
        _mm512_storeu_ps(out+tid*16,s);
      }
      double t=now()-t0; if(rep>=nbuf && t<best) best=t;
    }
    printf("%s: %.1f GB/s\n", mode==0?"dpbf16 k-paired":mode==1?"widen k-paired (shift/and)":"widen plain (zext+shift)", BYTES/best/1e9);
  }
  printf("%g\n", out[0]);
}
