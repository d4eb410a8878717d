// Read bandwidth by streams per thread (and software prefetch): gcc -O3 -march=native -fopenmp read_streams.c && OMP_NUM_THREADS=2 ./a.out
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <omp.h>
#include <sys/mman.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
// each thread reads its half of buf as S interleaved streams (S contiguous sub-chunks walked in lockstep)
float run(const float*buf,size_t n,int S,int pf){
  float total=0;
  #pragma omp parallel reduction(+:total)
  {
    int t=omp_get_thread_num(),T=omp_get_num_threads();
    size_t per=n/T; const float*b=buf+t*per; size_t sub=per/S;
    __m512 acc[8]; for(int s=0;s<8;s++)acc[s]=_mm512_setzero_ps();
    for(size_t i=0;i<sub;i+=16){
      for(int s=0;s<S;s++){
        if(pf) _mm_prefetch((const char*)(b+s*sub+i+pf),_MM_HINT_T0);
        acc[s]=_mm512_add_ps(acc[s],_mm512_load_ps(b+s*sub+i));}
    }
    for(int s=0;s<8;s++) total+=_mm512_reduce_add_ps(acc[s]);
  }
  return total;
}
int main(){
  size_t n=(size_t)2400<<18; // 2400 MB/4 ... 600M floats = 2.4GB
  float*buf=aligned_alloc(2<<20,n*4); if(getenv("HUGE")) madvise(buf,n*4,14); for(size_t i=0;i<n;i++)buf[i]=1.0f;
  size_t chunk=(size_t)150<<18; // 150MB per call
  int cfgs[][2]={{1,0},{2,0},{4,0},{8,0},{1,512},{1,1024},{2,512},{4,256},{1,2048}};
  for(int rep=0;rep<2;rep++)
  for(int c=0;c<9;c++){
    double best=1e9,tot=0; int k=0;
    for(size_t off=0;off+chunk<=n;off+=chunk,k++){double t0=now(); volatile float r=run(buf+off,chunk,cfgs[c][0],cfgs[c][1]); double dt=now()-t0; tot+=dt;}
    printf("streams/thread %d prefetch %5d floats ahead: %.1f GB/s\n",cfgs[c][0],cfgs[c][1],k*chunk*4/tot/1e9);
  }
}
