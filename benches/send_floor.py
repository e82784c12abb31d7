#!/usr/bin/env python3
# usage: python3 benches/send_floor.py SOCKETS EVENTS   (e.g. 10000 40)
# Floor: system CPU of one 200-byte send() per socket per event, loopback TCP,
# TCP_NODELAY, receiver in another process reading with epoll. Sender's stime only.
import socket, os, sys, time, select, resource
N=int(sys.argv[1]); EVENTS=int(sys.argv[2])
ls=socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,1); ls.bind(("127.0.0.1",0)); ls.listen(4096); port=ls.getsockname()[1]
pid=os.fork()
if pid==0:
    ep=select.epoll(); cs=[]
    for i in range(N):
        c=socket.socket(); c.setsockopt(socket.SOL_IP,24,1); c.bind(("127.0.0.%d"%(2+i%8),0)); c.connect(("127.0.0.1",port)); c.setblocking(False); ep.register(c.fileno(), select.EPOLLIN); cs.append(c)
    byfd={c.fileno():c for c in cs}; got=0; end=time.time()+120
    while got < N*EVENTS*200 and time.time()<end:
        for fd,_ in ep.poll(1):
            try: got+=len(byfd[fd].recv(65536))
            except BlockingIOError: pass
    os._exit(0)
ss=[]
for i in range(N):
    s,_=ls.accept(); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,1); ss.append(s)
payload=b"x"*200
r0=resource.getrusage(resource.RUSAGE_SELF)
for e in range(EVENTS):
    for s in ss: s.send(payload)
    time.sleep(0.05)
r1=resource.getrusage(resource.RUSAGE_SELF)
os.waitpid(pid,0)
print(f"floor: {N} sockets x {EVENTS} events: sender system CPU {(r1.ru_stime-r0.ru_stime)*1e6/(N*EVENTS):.2f} us per send, user {(r1.ru_utime-r0.ru_utime)*1e6/(N*EVENTS):.2f} us per send")
