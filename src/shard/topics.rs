//! A shard's topic index: topic name → the slots subscribed to it.
//!
//! Each topic holds a dense `Vec` of slot indexes, walked by the fan-out
//! writer. A connection remembers its position in each list, so leaving is a
//! `swap_remove` plus one position fix-up for the subscriber that moved, not
//! a search. A topic with no subscribers left is removed, so the index
//! returns to its baseline after churn.

use std::collections::HashMap;

use crate::conn::Subscription;
use crate::hub::Topic;

#[derive(Debug)]
pub struct TopicEntry {
    pub name: Topic,
    /// Subscribed slots, in no particular order.
    pub subscribers: Vec<u32>,
}

#[derive(Debug, Default)]
pub struct TopicIndex {
    by_name: HashMap<Topic, u32>,
    entries: Vec<Option<TopicEntry>>,
    free: Vec<u32>,
}

impl TopicIndex {
    /// Adds `slot` to `name`'s subscribers.
    pub fn join(&mut self, name: &Topic, slot: u32) -> Subscription {
        let topic = match self.by_name.get(name) {
            Some(&topic) => topic,
            None => {
                let entry = TopicEntry {
                    name: name.clone(),
                    subscribers: Vec::new(),
                };
                let topic = match self.free.pop() {
                    Some(topic) => {
                        self.entries[topic as usize] = Some(entry);
                        topic
                    }
                    None => {
                        self.entries.push(Some(entry));
                        (self.entries.len() - 1) as u32
                    }
                };
                self.by_name.insert(name.clone(), topic);
                topic
            }
        };
        let subscribers = &mut self.entries[topic as usize]
            .as_mut()
            .expect("live topic")
            .subscribers;
        subscribers.push(slot);
        Subscription {
            topic,
            position: (subscribers.len() - 1) as u32,
        }
    }

    /// Removes a subscription. Returns the slot that moved into its position
    /// (whose subscription to this topic must be updated), if any.
    pub fn leave(&mut self, subscription: Subscription) -> Option<u32> {
        let entry = self.entries[subscription.topic as usize]
            .as_mut()
            .expect("live topic");
        let position = subscription.position as usize;
        entry.subscribers.swap_remove(position);
        let moved = entry.subscribers.get(position).copied();
        if entry.subscribers.is_empty() {
            let name = self.entries[subscription.topic as usize]
                .take()
                .expect("live topic")
                .name;
            self.by_name.remove(&name);
            self.free.push(subscription.topic);
        } else if entry.subscribers.len() * 4 < entry.subscribers.capacity()
            && entry.subscribers.capacity() > 64
        {
            let half = entry.subscribers.capacity() / 2;
            entry.subscribers.shrink_to(half);
        }
        moved
    }

    /// The subscribers of a topic, if anyone is subscribed.
    pub fn subscribers(&self, name: &str) -> Option<&[u32]> {
        let &topic = self.by_name.get(name)?;
        Some(
            &self.entries[topic as usize]
                .as_ref()
                .expect("live topic")
                .subscribers,
        )
    }

    pub fn name(&self, topic: u32) -> &Topic {
        &self.entries[topic as usize]
            .as_ref()
            .expect("live topic")
            .name
    }

    /// Topics with at least one subscriber.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leave_moves_the_last_subscriber_and_reports_it() {
        let mut index = TopicIndex::default();
        let topic: Topic = "a".into();
        let subs: Vec<_> = (10..14).map(|slot| index.join(&topic, slot)).collect();
        assert_eq!(index.leave(subs[1]), Some(13));
        assert_eq!(index.subscribers("a").unwrap(), &[10, 13, 12]);
        assert_eq!(
            index.leave(Subscription {
                topic: subs[0].topic,
                position: 2
            }),
            None
        );
        assert_eq!(index.subscribers("a").unwrap(), &[10, 13]);
    }

    #[test]
    fn empty_topics_are_removed_and_reused() {
        let mut index = TopicIndex::default();
        let a = index.join(&"a".into(), 1);
        index.leave(a);
        assert!(index.is_empty());
        assert!(index.subscribers("a").is_none());
        let b = index.join(&"b".into(), 2);
        assert_eq!(b.topic, a.topic, "the entry is reused");
    }
}
