//! The async runtime openraft runs on.
//!
//! Production uses openraft's `TokioRuntime`. Under `--cfg madsim` the same
//! node code runs on [`MadsimRuntime`], which routes openraft's spawns, sleeps,
//! timeouts and randomness through madsim so simulated runs are deterministic.
//! Everything else in the node goes through the renamed `tokio` crate, which
//! madsim already swaps.
#[cfg(not(madsim))]
pub type Runtime = openraft::TokioRuntime;

#[cfg(madsim)]
pub type Runtime = sim::MadsimRuntime;

#[cfg(madsim)]
mod sim {
    use std::fmt;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use openraft::async_runtime::TokioOneShotSender;
    use openraft::{AsyncRuntime, OptionalSend, TokioInstant};

    #[derive(Debug, Default, PartialEq, Eq)]
    pub struct MadsimRuntime;

    /// madsim's own `timeout()` future is unnameable and not `Send`, so
    /// openraft gets this small equivalent: the future raced against a sleep.
    pub struct Timeout<F> {
        future: Pin<Box<F>>,
        sleep: Pin<Box<madsim::time::Sleep>>,
    }

    #[derive(Debug)]
    pub struct Elapsed;

    impl fmt::Display for Elapsed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("deadline elapsed")
        }
    }

    impl std::error::Error for Elapsed {}

    impl<F: Future> Future for Timeout<F> {
        type Output = Result<F::Output, Elapsed>;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            if let Poll::Ready(v) = self.future.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
                Poll::Pending => Poll::Pending,
            }
        }
    }

    fn until(deadline: TokioInstant) -> madsim::time::Instant {
        deadline.into_std()
    }

    impl AsyncRuntime for MadsimRuntime {
        type JoinError = madsim::task::JoinError;
        type JoinHandle<T: OptionalSend + 'static> = madsim::task::JoinHandle<T>;
        type Sleep = madsim::time::Sleep;
        type Instant = TokioInstant;
        type TimeoutError = Elapsed;
        type Timeout<R, T: Future<Output = R> + OptionalSend> = Timeout<T>;
        type ThreadLocalRng = madsim::rand::GlobalRng;
        type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
        type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;
        type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;

        fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
        where
            T: Future + OptionalSend + 'static,
            T::Output: OptionalSend + 'static,
        {
            madsim::task::spawn(future)
        }

        fn sleep(duration: Duration) -> Self::Sleep {
            madsim::time::sleep(duration)
        }

        fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
            madsim::time::sleep_until(until(deadline))
        }

        fn timeout<R, F: Future<Output = R> + OptionalSend>(
            duration: Duration,
            future: F,
        ) -> Self::Timeout<R, F> {
            Timeout { future: Box::pin(future), sleep: Box::pin(madsim::time::sleep(duration)) }
        }

        fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
            deadline: Self::Instant,
            future: F,
        ) -> Self::Timeout<R, F> {
            Timeout { future: Box::pin(future), sleep: Box::pin(madsim::time::sleep_until(until(deadline))) }
        }

        fn is_panic(join_error: &Self::JoinError) -> bool {
            join_error.is_panic()
        }

        fn thread_rng() -> Self::ThreadLocalRng {
            madsim::rand::thread_rng()
        }

        fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
        where
            T: OptionalSend,
        {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (TokioOneShotSender(tx), rx)
        }
    }
}
