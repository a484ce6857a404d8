//! The demo data set: two users and their conversation, with fixed ids so that `db seed`,
//! `ddb seed` and `cognito seed` agree with each other and a re-run adds nothing.

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use crate::model::{Message, MessageGroup, MessageGroupId, MessageId, Sk, UserUuid};

pub struct DemoUser {
    pub uuid: UserUuid,
    pub display_name: &'static str,
    pub handle: &'static str,
    pub email: &'static str,
}

pub const PASSWORD: &str = "Testing123!";

pub fn users() -> [DemoUser; 2] {
    [
        DemoUser {
            uuid: UserUuid(Uuid::from_u128(0x5ad1a0f4_54b9_4d2f_a5b0_7c3e7a1f0b01)),
            display_name: "Andrew Brown",
            handle: "andrewbrown",
            email: "andrew@exampro.co",
        },
        DemoUser {
            uuid: UserUuid(Uuid::from_u128(0x0b8c3e26_9a4e_4c71_b6d2_2f4f6a9d0b02)),
            display_name: "Andrew Bayko",
            handle: "bayko",
            email: "bayko@exampro.co",
        },
    ]
}

pub fn group_id() -> MessageGroupId {
    MessageGroupId(Uuid::from_u128(0x5ae290ed_55d1_47a0_bc6d_fe2bc2700399))
}

fn message_id(i: usize) -> MessageId {
    // v5 ids derived from the position keep every message's id stable across runs.
    MessageId(Uuid::new_v5(&group_id().0, format!("demo-message-{i}").as_bytes()))
}

/// The conversation, oldest first. Andrew Brown speaks first, then they alternate.
pub const CONVERSATION: &[&str] = &[
    "Have you ever watched Babylon 5? I keep hearing it's the show that made Deep Space Nine possible.",
    "Yes, I have seen the whole thing, twice. I'd argue DS9 is the better show, but B5 did it first.",
    "I watched DS9 end to end last year. The Dominion War arc is still the best thing Star Trek ever did.",
    "The Dominion War is great, but B5 planned its five-year arc from the pilot. That's a different kind of ambition.",
    "Planned, sure. But DS9 had the better characters. Garak alone is worth the price of admission.",
    "Garak is fantastic. \"Lies, my dear doctor, are like lint.\" Okay, I made that one up, but it sounds like him.",
    "Ha. The real line is about the truth being in the eye of the beholder, or something close to it.",
    "Londo Mollari is B5's Garak, though. Tragic, funny, and you know where he ends up from the start.",
    "That prophecy in the first season, with the hands around his throat? Chilling in hindsight.",
    "Exactly. B5 tells you the ending and still makes you dread it. That's the trick of planning ahead.",
    "DS9 didn't plan the war from day one, and you can kind of tell in season three.",
    "Season three of DS9 is where it finds its feet, though. The Defiant shows up and everything changes.",
    "The Defiant is the best ship in the franchise. \"It's a warship, Captain.\" \"It's an escort.\"",
    "And B5 has the White Star, which is basically a Vorlon-Minbari hot rod.",
    "The Vorlons still confuse me. Kosh never gives a straight answer about anything.",
    "\"The avalanche has already started. It is too late for the pebbles to vote.\" That's a straight answer, sort of.",
    "That is a great line. Grim, but great.",
    "B5 is full of those. \"Who are you?\" and \"What do you want?\" carry the whole show.",
    "The Shadows asking \"What do you want?\" to Londo is such a good hook.",
    "And the Vorlons asking \"Who are you?\" to Sheridan. Order versus chaos, and neither is right.",
    "DS9 did the morally grey thing too. \"In the Pale Moonlight\" is the best episode of Star Trek.",
    "\"I can live with it.\" Sisko's log in that episode still gives me chills.",
    "Avery Brooks sells that monologue like nobody else could.",
    "Bruce Boxleitner as Sheridan is good too, but I think Sinclair had more mystery.",
    "Sinclair leaving after season one was rough. Did they plan that?",
    "Not originally. Michael O'Hare had personal reasons; they rewrote the arc around it, and it worked.",
    "That's the thing: 'planned' still meant rewriting on the fly.",
    "Sure, but the bones of the story held. Valen, the Minbari souls, the great war, it all paid off.",
    "\"Babylon Squared\" and \"War Without End\" are a satisfying pair of episodes.",
    "Time travel done right, for once. No reset button.",
    "DS9 had some good time travel too. \"Trials and Tribble-ations\" is pure joy.",
    "Sisko meeting Kirk through archive footage. The effects team earned their paychecks.",
    "\"Far Beyond the Stars\" is another favourite. Benny Russell's story hits hard.",
    "That episode is remarkable. It's the one I show people who think Star Trek is only about spaceships.",
    "B5's \"Comes the Inquisitor\" is the equivalent for me. Delenn's interrogation is brutal.",
    "I don't remember that one well. Is that the Jack the Ripper one?",
    "Yes. Sebastian asks Delenn over and over, \"Who are you?\" until she finally understands.",
    "That show really loves its questions.",
    "It does. What about the music? Christopher Franke's score versus DS9's?",
    "DS9's theme is gorgeous, especially the later version with the trumpet.",
    "The B5 season four theme is my favourite. Big, loud, a bit too much, like the show.",
    "\"A bit too much\" describes some of B5's dialogue too, honestly.",
    "Fair. JMS wrote almost every episode himself, so you get his voice everywhere.",
    "Which is impressive and also exhausting. DS9 had a whole writers' room to balance it.",
    "Ira Steven Behr and Ronald D. Moore, among others. That room was stacked.",
    "Moore went on to do Battlestar Galactica, which borrows a lot from DS9's darker turns.",
    "True. \"So say we all\" has DS9 energy.",
    "What about the effects? B5's CGI was groundbreaking for TV in 1993.",
    "Groundbreaking then, rough now. DS9's models still look great.",
    "The remastered DS9 would be amazing. They did it for TNG, why not DS9?",
    "Money, mostly. The CGI for the war episodes was rendered at standard definition.",
    "B5 has the same problem, even worse. The widescreen effects were never finished in HD.",
    "Such a shame. Both shows deserve better releases.",
    "Agreed. Okay, favourite characters: mine is Odo, no contest.",
    "Odo is great. \"Changeling.\" Said with that particular mix of pride and loneliness.",
    "His relationship with Kira took forever, but it was worth it.",
    "For B5, mine is G'Kar. His arc from villain to prophet is amazing.",
    "G'Kar's speech in \"The Long Night\"... or was it in prison? The one about the universe.",
    "\"The universe is made of stories, not atoms.\" Wait, that's Muriel Rukeyser, not G'Kar. I mix them up.",
    "Ha, close enough. G'Kar would have liked that line.",
    "His \"Declaration of Principles\" is the real one. It's quoted on forums to this day.",
    "DS9's Quark has the Rules of Acquisition, which are quoted just as often.",
    "\"Rule of Acquisition number 1: Once you have their money, you never give it back.\"",
    "\"Rule 34: War is good for business.\" \"Rule 35: Peace is good for business.\"",
    "That pair sums up Ferengi philosophy perfectly.",
    "Quark is also secretly the moral centre of the station sometimes.",
    "\"The Siege of AR-558\" has that great Quark speech about humans.",
    "\"Let me tell you something about hew-mons, nephew.\" Yes! Armin Shimerman was brilliant.",
    "B5 has Zack Allan, who is the everyman in the same way.",
    "And Garibaldi, before things went wrong for him in season four.",
    "The Bester plot with Garibaldi was cruel. Walter Koenig played Bester so well.",
    "Chekov as a Psi Cop villain. Perfect casting, and a nice nod to Trek.",
    "There are a lot of Trek actors in B5, aren't there?",
    "Several. And a few B5 actors showed up in Trek later. The two shows were never really enemies.",
    "Except for the \"DS9 copied B5\" arguments on Usenet in 1993.",
    "Those were intense. Both shows were pitched around the same time, so the debate never ends.",
    "I think both are better for having existed at the same time.",
    "Competition made them both push harder. DS9 got darker, B5 got more confident.",
    "Okay, final question: if you could only rewatch one, which would it be?",
    "DS9. The characters feel like family by the end, and \"What You Leave Behind\" hurts in the best way.",
    "B5 for me. \"Sleeping in Light\" is the perfect ending. Sheridan's last flight still wrecks me.",
    "The ending where the station gets turned off, light by light?",
    "Yes. \"It was the dawn of the third age of mankind...\" and then it's just gone.",
    "That's beautiful. Maybe I'll rewatch B5 this winter.",
    "Do it. Skip most of season one if you need to, but don't skip \"Signs and Portents\".",
    "Noted. And you should rewatch the last ten episodes of DS9 back to back.",
    "Deal. We can compare notes afterwards.",
    "We should start a watch club at work. Half the team has never seen either.",
    "That's a great idea. Fridays after standup?",
    "Fridays after standup. I'll book the big meeting room.",
    "I'll bring snacks. Raktajino for the DS9 crowd.",
    "And I'll bring something for the B5 fans. Maybe jala, if I can find a recipe.",
    "G'Kar would approve.",
    "So would Quark, as long as someone pays the tab.",
    "\"Rule 57: Good customers are as rare as latinum. Treasure them.\"",
    "You've been rereading the Rules, haven't you?",
    "Maybe. They're oddly good career advice.",
    "Ha! Okay, see you Friday. Bring the Rules.",
    "See you Friday. \"Faith manages.\"",
    "\"And so it begins.\"",
];

/// The demo messages, the newest at `now` and one minute apart going back.
pub(crate) fn messages(now: DateTime<Utc>) -> Vec<Message> {
    let users = users();
    let n = CONVERSATION.len();
    CONVERSATION
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let sender = &users[i % 2];
            Message {
                group: group_id(),
                sk: Sk::from_instant(now - Duration::minutes((n - 1 - i) as i64)),
                message_uuid: message_id(i),
                message: (*text).to_string(),
                user_uuid: sender.uuid,
                user_display_name: sender.display_name.to_string(),
                user_handle: sender.handle.to_string(),
            }
        })
        .collect()
}

/// One group row per participant, naming the other one, at the newest message.
pub(crate) fn groups(messages: &[Message]) -> Vec<MessageGroup> {
    let users = users();
    let Some(last) = messages.last() else {
        return Vec::new();
    };
    [(0, 1), (1, 0)]
        .into_iter()
        .map(|(owner, other)| MessageGroup {
            owner: users[owner].uuid,
            sk: last.sk.clone(),
            message_group_uuid: group_id(),
            message: last.message.clone(),
            user_uuid: users[other].uuid,
            user_display_name: users[other].display_name.to_string(),
            user_handle: users[other].handle.to_string(),
        })
        .collect()
}
